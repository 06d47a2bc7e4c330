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

numpy only, so the light client samples with the same code as every other party; scores given as torch tensors (the
server, the enclave) are read as numpy, and `candidates` answers in the type it was given. The seeded draw is torch's
own: the first 32-bit outputs of MT19937 seeded as `torch.Generator().manual_seed(seed)` seeds it, 24 bits each, as
`torch.rand` makes a float32, so a seed gives the same tokens as it did when this module drew with torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from stip.common.arrays import like, to_numpy

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


def apply_repetition_penalty(scores: np.ndarray, ids: np.ndarray | None, seen: np.ndarray,
                             penalty: float) -> np.ndarray:
    """RepetitionPenaltyLogitsProcessor on `scores` (vocabulary order if `ids` is None, else scores of `ids`)."""
    if penalty == 1.0 or seen.size == 0:
        return scores
    scores = scores.copy()
    if ids is None:
        mask = np.zeros(scores.shape, dtype=bool)
        mask[seen] = True
    else:
        mask = np.isin(ids, seen)
    s = scores[mask]
    scores[mask] = np.where(s < 0, s * np.float32(penalty), s / np.float32(penalty))
    return scores


def apply_presence_frequency(scores: np.ndarray, ids: np.ndarray | None, counts: dict[int, int],
                             presence: float, frequency: float) -> np.ndarray:
    """OpenAI's penalties: `score -= presence * [count > 0] + frequency * count`, counts over generated tokens.
    `scores` in vocabulary order if `ids` is None, else the scores of `ids` (only those can be penalised)."""
    if not counts or (presence == 0 and frequency == 0):
        return scores
    if ids is None:
        where = np.fromiter(counts, dtype=np.int64, count=len(counts))
        c = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
        scores = scores.copy()
        scores[where] -= np.float32(presence) + np.float32(frequency) * c
        return scores
    c = np.array([counts.get(i, 0) for i in ids.tolist()], dtype=np.float32)
    return scores - (np.float32(presence) * (c > 0).astype(np.float32) + np.float32(frequency) * c)


def apply_logit_bias(scores: np.ndarray, ids: np.ndarray | None, bias: dict[int, float]) -> np.ndarray:
    """OpenAI's logit_bias: each listed token's bias added to its score (`scores` [V], or the scores of `ids`)."""
    if not bias:
        return scores
    tokens = np.fromiter(bias, dtype=np.int64, count=len(bias))
    values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))
    if ids is None:
        scores = scores.copy()
        np.add.at(scores, tokens, values)
        return scores
    return scores + (ids.reshape(-1, 1) == tokens.reshape(1, -1)).astype(np.float32) @ values


def softmax(x: np.ndarray) -> np.ndarray:
    """float32 softmax of a vector (max subtracted, as torch's)."""
    e = np.exp(x - x.max()) if x.size else x
    return e / e.sum(dtype=np.float32)


def top_p_keep(sorted_desc, top_p: float) -> int:
    """How many of the (descending) scores TopPLogitsWarper keeps: those not in the low tail of mass <= 1 - top_p."""
    sorted_desc = to_numpy(sorted_desc, np.float32)
    if top_p >= 1.0:
        return int(sorted_desc.size)
    asc = sorted_desc[::-1]
    remove = np.cumsum(softmax(asc), dtype=np.float32) <= np.float32(1 - top_p)
    remove[-1] = False  # min_tokens_to_keep = 1
    return int(sorted_desc.size - int(remove.sum()))


class TorchSeededDraws:
    """Uniform float32 draws in [0, 1) exactly as `torch.rand((), generator=g)` gives them after
    `g.manual_seed(seed)`: MT19937 seeded with the seed's low 32 bits, one 32-bit output per draw, its low 24 bits
    over 2^24. Unseeded: seeded from os.urandom."""

    def __init__(self, seed: int | None):
        seed = int.from_bytes(os.urandom(4), "little") if seed is None else int(seed) & 0xFFFFFFFF
        self._bits = np.random.RandomState(seed)._bit_generator

    def next(self) -> float:
        word = int(self._bits.random_raw())
        return float(np.float32((word & 0xFFFFFF) * 2.0 ** -24))


class Sampler:
    """Stateful per generation: the tokens seen so far (for the repetition penalty), how often each generated token
    occurred (for the presence and frequency penalties) and the seeded draws. `history` is the prompt."""

    def __init__(self, params: SamplingParams, history: Iterable[int] = ()):
        self.params = params
        self.draws = TorchSeededDraws(params.seed)
        self._seen: list[int] = []
        self._seen_set: set[int] = set()
        self._seen_array: np.ndarray | None = None
        self.counts: dict[int, int] = {}  # generated tokens only
        for t in to_numpy(list(history) if not hasattr(history, "shape") else history).reshape(-1).tolist():
            self._see(int(t))

    def observe(self, token_id: int) -> None:
        """A generated token."""
        self.counts[token_id] = self.counts.get(token_id, 0) + 1
        self._see(token_id)

    def _see(self, token_id: int) -> None:
        if token_id not in self._seen_set:
            self._seen_set.add(token_id)
            self._seen.append(token_id)
            self._seen_array = None

    @property
    def seen(self) -> np.ndarray:
        if self._seen_array is None:
            self._seen_array = np.array(self._seen, dtype=np.int64)
        return self._seen_array

    def from_logits(self, logits) -> int:
        """Next token id from plain logits [V] (vocabulary order)."""
        return self._pick(*self._candidates(to_numpy(logits, np.float32), None))

    def from_topk(self, ids, values) -> int:
        """Next token id from the server's top-k pairs, `ids` already mapped to plain token ids."""
        return self._pick(*self._candidates(to_numpy(values, np.float32), to_numpy(ids, np.int64)))

    def candidates(self, scores, ids=None):
        """The tokens this step may draw and their processed scores, highest first: what transformers' processors
        leave finite, in their order (repetition penalty, presence and frequency, temperature, top-k, top-p). Greedy:
        the one best token after the penalties. `scores` [V] in vocabulary order, or the scores of `ids`. Answers
        in the type of `scores` (numpy, or torch)."""
        out_ids, values = self._candidates(to_numpy(scores, np.float32), None if ids is None else
                                           to_numpy(ids, np.int64))
        return like(out_ids, scores), like(values, scores)

    def _candidates(self, scores: np.ndarray, ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        scores = self._penalize(scores, ids)
        if p.greedy:
            best = int(scores.argmax())
            return (np.array([best]) if ids is None else ids[best:best + 1]), scores[best:best + 1]
        scores = scores / np.float32(p.temperature)
        n = scores.size
        order = np.argsort(-scores, kind="stable")  # highest first; ties keep the lower index (or the k's order)
        if 0 < p.top_k < n:
            order = order[:p.top_k]
        values = scores[order]
        keep = top_p_keep(values, p.top_p)
        return (order if ids is None else ids[order])[:keep], values[:keep]

    def _penalize(self, scores: np.ndarray, ids: np.ndarray | None) -> np.ndarray:
        """logit_bias, the repetition penalty, then presence and frequency; what is off costs nothing per token."""
        p = self.params
        scores = apply_logit_bias(scores, ids, p.logit_bias)
        if p.repetition_penalty != 1.0:
            scores = apply_repetition_penalty(scores, ids, self.seen, p.repetition_penalty)
        return apply_presence_frequency(scores, ids, self.counts, p.presence_penalty, p.frequency_penalty)

    def _pick(self, ids: np.ndarray, values: np.ndarray) -> int:
        """Greedy: the one candidate. Sampling: one seeded uniform draw over the candidates' softmax."""
        if self.params.greedy:
            return int(ids[0])
        probs = softmax(values)
        u = self.draws.next()
        cdf = np.cumsum(probs, dtype=np.float32)
        i = int(np.searchsorted(cdf, np.float32(u * float(probs.sum(dtype=np.float32))), side="right"))
        return int(ids[min(i, ids.size - 1)])
