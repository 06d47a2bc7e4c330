"""A vLLM logits processor for round-trip sessions: each row's log-sum-exp travels in the top-k vLLM returns.

vLLM returns one kind of number per token (its `logprobs_mode`). Round-trip clients need two: the raw logits, since
transformers' repetition penalty acts on logits (a logit's sign decides whether it is divided or multiplied, so
log-probabilities give other tokens), and each row's log-sum-exp over all V logits, for exact log-probabilities.
With `logprobs_mode="processed_logits"` and greedy one-token requests, vLLM reports the logits as this processor
leaves them (no penalty or temperature runs). The processor writes the row's log-sum-exp into the row's least likely
token, raised to just above the row's maximum where the two are equal in float32: that token becomes the unique
top-ranked entry and the sampled token, and the k entries after it are the k largest raw logits, untouched
(`stip.server.vllm_round_trip` takes it out again). Imported only by vLLM's engine process (`logits_processors`).
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor

FQCN = "stip.server.vllm_logits:LogsumexpCarrier"


def carry_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """Each row's least likely logit replaced (in place) by the row's log-sum-exp, strictly above the row's max."""
    if logits.shape[0] == 0 or logits.shape[1] < 2:
        return logits
    lse = torch.logsumexp(logits, dim=-1)
    top = logits.max(dim=-1).values
    carried = torch.maximum(lse, torch.nextafter(top, torch.full_like(top, float("inf"))))
    logits.scatter_(1, logits.argmin(dim=-1, keepdim=True), carried.unsqueeze(1).to(logits.dtype))
    return logits


class LogsumexpCarrier(LogitsProcessor):
    """Every row of every batch (the round-trip engine sends only its own greedy one-token requests)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        pass

    def is_argmax_invariant(self) -> bool:
        return False  # it must run before greedy sampling, where vLLM reads processed logits

    def update_state(self, batch_update) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return carry_logsumexp(logits)
