"""Choosing the next token from full logits or from top-k (id, value) pairs: on the client in round-trip mode, on
the server (in permuted ids, where counts and values are the same) in server-decode mode.

Semantics follow transformers' `generate` (in its order), after OpenAI's logit_bias (token id -> bias added):
RepetitionPenaltyLogitsProcessor (over every token seen, prompt included), then OpenAI's presence and frequency
penalties (over the generated tokens only: `logit -= presence * [count > 0] + frequency * count`, as vLLM applies them
after the repetition penalty), then TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper. temperature 0 is
greedy (penalties still apply).

Both inputs are reduced to candidates sorted by value (highest first) and one seeded uniform draw picks among them,
so the two downlinks sample the same token whenever the kept set is the same (e.g. top_k <= the downlink's k).
With the top-k downlink the distribution is the one truncated to the k tokens the server sent (the tail mass is
unknown to the client): greedy is exact, sampling is exact when top_k <= k, otherwise a close approximation.
Penalties on the top-k downlink apply to the k tokens the server sent: a penalised token can fall below a token
outside those k, which the client cannot see, so with penalties the choice is exact only while it stays inside them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off
    presence_penalty: float = 0.0  # OpenAI's, over generated tokens; 0: off
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # record each token's logprob and this many top alternatives; None: off
    logit_bias: dict[int, float] = field(default_factory=dict)  # OpenAI's: token id -> bias added to its logit
    grammar: str | None = None  # an llguidance grammar the output must match (stip.client.constrained); None: off

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 is off)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs (top alternatives per token) must be in [0, {MAX_TOP_LOGPROBS}]")
        self.logit_bias = {int(t): float(b) for t, b in (self.logit_bias or {}).items()}
        for t, b in self.logit_bias.items():
            if t < 0 or not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias maps token ids (>= 0) to a bias in [-100, 100], not {t}: {b}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(scores: torch.Tensor, ids: torch.Tensor | None, seen: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """RepetitionPenaltyLogitsProcessor on `scores` (vocabulary order if `ids` is None, else scores of `ids`)."""
    if penalty == 1.0 or seen.numel() == 0:
        return scores
    scores = scores.clone()
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if ids is None:
        mask[seen] = True
    else:
        mask = torch.isin(ids, seen)
    s = scores[mask]
    scores[mask] = torch.where(s < 0, s * penalty, s / penalty)
    return scores


def apply_presence_frequency(scores: torch.Tensor, ids: torch.Tensor | None, counts: dict[int, int],
                             presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties: `score -= presence * [count > 0] + frequency * count`, counts over generated tokens.
    `scores` in vocabulary order if `ids` is None, else the scores of `ids` (only those can be penalised)."""
    if not counts or (presence == 0 and frequency == 0):
        return scores
    if ids is None:
        where = torch.tensor(list(counts), dtype=torch.long)
        c = torch.tensor(list(counts.values()), dtype=scores.dtype)
        scores = scores.clone()
        scores[where] -= presence + frequency * c
        return scores
    c = torch.tensor([counts.get(i, 0) for i in ids.tolist()], dtype=scores.dtype)
    return scores - (presence * (c > 0).to(scores.dtype) + frequency * c)


def apply_logit_bias(scores: torch.Tensor, ids: torch.Tensor | None, bias: dict[int, float]) -> torch.Tensor:
    """OpenAI's logit_bias: each listed token's bias added to its score (`scores` [V], or the scores of `ids`)."""
    if not bias:
        return scores
    tokens = torch.tensor(list(bias), dtype=torch.long)
    values = torch.tensor(list(bias.values()), dtype=scores.dtype)
    if ids is None:
        return scores.index_add(0, tokens, values)
    return scores + (ids.reshape(-1, 1) == tokens.reshape(1, -1)).to(scores.dtype) @ values


def top_p_keep(sorted_desc: torch.Tensor, top_p: float) -> int:
    """How many of the (descending) scores TopPLogitsWarper keeps: those not in the low tail of mass <= 1 - top_p."""
    if top_p >= 1.0:
        return int(sorted_desc.numel())
    asc = sorted_desc.flip(0)
    remove = asc.softmax(-1).cumsum(-1) <= (1 - top_p)
    remove[-1] = False  # min_tokens_to_keep = 1
    return int(sorted_desc.numel() - int(remove.sum()))


class Sampler:
    """Stateful per generation: the tokens seen so far (for the repetition penalty), how often each generated token
    occurred (for the presence and frequency penalties) and the seeded generator. `history` is the prompt."""

    def __init__(self, params: SamplingParams, history: Iterable[int] = ()):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(params.seed))
        self._seen: list[int] = []
        self._seen_set: set[int] = set()
        self._seen_tensor: torch.Tensor | None = None
        self.counts: dict[int, int] = {}  # generated tokens only
        for t in history:
            self._see(t)

    def observe(self, token_id: int) -> None:
        """A generated token."""
        self.counts[token_id] = self.counts.get(token_id, 0) + 1
        self._see(token_id)

    def _see(self, token_id: int) -> None:
        if token_id not in self._seen_set:
            self._seen_set.add(token_id)
            self._seen.append(token_id)
            self._seen_tensor = None

    @property
    def seen(self) -> torch.Tensor:
        if self._seen_tensor is None:
            self._seen_tensor = torch.tensor(self._seen, dtype=torch.long)
        return self._seen_tensor

    def from_logits(self, logits: torch.Tensor) -> int:
        """Next token id from plain logits [V] (vocabulary order)."""
        return self._pick(*self.candidates(logits))

    def from_topk(self, ids: torch.Tensor, values: torch.Tensor) -> int:
        """Next token id from the server's top-k pairs, `ids` already mapped to plain token ids."""
        return self._pick(*self.candidates(values, ids))

    def candidates(self, scores: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens this step may draw and their processed scores, highest first: what transformers' processors
        leave finite, in their order (repetition penalty, presence and frequency, temperature, top-k, top-p). Greedy:
        the one best token after the penalties. `scores` [V] in vocabulary order, or the scores of `ids`."""
        p = self.params
        scores = self._penalize(scores.float(), ids)
        if p.greedy:
            best = int(scores.argmax())
            return (torch.tensor([best]) if ids is None else ids[best:best + 1]), scores[best:best + 1]
        scores = scores / p.temperature
        n = scores.numel()
        if ids is None:
            values, order = torch.topk(scores, p.top_k if 0 < p.top_k < n else n)  # sorted, highest first
        else:
            values, order = torch.sort(scores, descending=True, stable=True)
            if 0 < p.top_k < n:
                values, order = values[:p.top_k], order[:p.top_k]
        keep = top_p_keep(values, p.top_p)
        return (order if ids is None else ids[order])[:keep], values[:keep]

    def _penalize(self, scores: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """logit_bias, the repetition penalty, then presence and frequency; what is off costs nothing per token."""
        p = self.params
        scores = apply_logit_bias(scores, ids, p.logit_bias)
        if p.repetition_penalty != 1.0:
            scores = apply_repetition_penalty(scores, ids, self.seen, p.repetition_penalty)
        return apply_presence_frequency(scores, ids, self.counts, p.presence_penalty, p.frequency_penalty)

    def _pick(self, ids: torch.Tensor, values: torch.Tensor) -> int:
        """Greedy: the one candidate. Sampling: one seeded uniform draw over the candidates' softmax."""
        if self.params.greedy:
            return int(ids[0])
        probs = values.softmax(-1)
        u = float(torch.rand((), generator=self.generator))
        i = int(torch.searchsorted(probs.cumsum(-1), torch.tensor(u * float(probs.sum())), right=True))
        return int(ids[min(i, ids.numel() - 1)])
