"""Choosing the next token on the client, from full plain logits or from the server's top-k (id, value) pairs.

Semantics follow transformers' `generate` (in its order): RepetitionPenaltyLogitsProcessor (over every token seen,
prompt included), then TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper. temperature 0 is greedy.

Both inputs are reduced to candidates sorted by value (highest first) and one seeded uniform draw picks among them,
so the two downlinks sample the same token whenever the kept set is the same (e.g. top_k <= the downlink's k).
With the top-k downlink the distribution is the one truncated to the k tokens the server sent (the tail mass is
unknown to the client): greedy is exact, sampling is exact when top_k <= k, otherwise a close approximation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

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


def top_p_keep(sorted_desc: torch.Tensor, top_p: float) -> int:
    """How many of the (descending) scores TopPLogitsWarper keeps: those not in the low tail of mass <= 1 - top_p."""
    if top_p >= 1.0:
        return int(sorted_desc.numel())
    asc = sorted_desc.flip(0)
    remove = asc.softmax(-1).cumsum(-1) <= (1 - top_p)
    remove[-1] = False  # min_tokens_to_keep = 1
    return int(sorted_desc.numel() - int(remove.sum()))


class Sampler:
    """Stateful per generation: the tokens seen so far (for the repetition penalty) and the seeded generator."""

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
        for t in history:
            self.observe(t)

    def observe(self, token_id: int) -> None:
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
        p = self.params
        scores = self._penalize(logits.float(), None)
        if p.greedy:
            return int(scores.argmax())
        k = p.top_k if 0 < p.top_k < scores.numel() else scores.numel()
        values, ids = torch.topk(scores, k)  # sorted, highest first
        return self._draw(ids, values)

    def from_topk(self, ids: torch.Tensor, values: torch.Tensor) -> int:
        """Next token id from the server's top-k pairs, `ids` already mapped to plain token ids."""
        p = self.params
        values = self._penalize(values.float(), ids)
        if p.greedy:
            return int(ids[int(values.argmax())])
        values, order = torch.sort(values, descending=True, stable=True)
        ids = ids[order]
        if 0 < p.top_k < values.numel():
            ids, values = ids[:p.top_k], values[:p.top_k]
        return self._draw(ids, values)

    def _penalize(self, scores: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """The repetition penalty; without one, the seen-token tensor is never built (nothing per token)."""
        if self.params.repetition_penalty == 1.0:
            return scores
        return apply_repetition_penalty(scores, ids, self.seen, self.params.repetition_penalty)

    def _draw(self, ids: torch.Tensor, values: torch.Tensor) -> int:
        """Temperature, top-p, then one uniform draw over candidates sorted highest first."""
        scaled = values / self.params.temperature
        n = top_p_keep(scaled, self.params.top_p)
        probs = scaled[:n].softmax(-1)
        u = float(torch.rand((), generator=self.generator))
        i = int(torch.searchsorted(probs.cumsum(-1), torch.tensor(u * float(probs.sum())), right=True))
        return int(ids[min(i, n - 1)])

    def processed(self, logits: torch.Tensor) -> torch.Tensor:
        """The full processed score vector (-inf where removed), as transformers would build it: for tests."""
        p = self.params
        scores = self._penalize(logits.float(), None)
        if p.greedy:
            return scores
        scores = scores / p.temperature
        if 0 < p.top_k < scores.numel():
            scores = scores.masked_fill(scores < torch.topk(scores, p.top_k).values[-1], float("-inf"))
        sorted_desc, order = torch.sort(scores, descending=True)
        n = top_p_keep(sorted_desc, p.top_p)
        out = torch.full_like(scores, float("-inf"))
        out[order[:n]] = sorted_desc[:n]
        return out
