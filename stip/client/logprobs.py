"""Each generated token's log-probability, and its most likely alternatives, from what the downlink carries.

These are the model's own log-probabilities (log_softmax of the raw logits), before the repetition, presence and
frequency penalties, temperature, top-k and top-p: what OpenAI and vLLM report. Both downlinks give them exactly:
- logits downlink: log_softmax over the un-permuted logits;
- top-k downlink: value - logsumexp, where the server computes each row's logsumexp over the full vocabulary and sends
  it with the k pairs (protocol 2). Only the k tokens sent are known, so at most k alternatives; the sampled token is
  always one of them (the client samples among the k).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stip.common.arrays import to_numpy
from stip.errors import StipError


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


def log_softmax(x: np.ndarray) -> np.ndarray:
    """float32 log_softmax along the last axis (in float64, rounded once)."""
    x64 = x.astype(np.float64)
    m = x64.max(axis=-1, keepdims=True)
    return (x64 - m - np.log(np.exp(x64 - m).sum(axis=-1, keepdims=True))).astype(np.float32)


def top_of(lp: np.ndarray, top: int) -> list[tuple[int, float]]:
    """The `top` (id, logprob) pairs of a [V] row of logprobs, most likely first (ties: lower id first)."""
    if not top:
        return []
    order = np.argsort(-lp, kind="stable")[:top]
    return list(zip(order.tolist(), lp[order].tolist()))


def step_logprob(bundle, r, token: int, top: int) -> TokenLogprob:
    """The logprob of `token` (the one just picked from reply `r`'s last row) and the `top` most likely tokens."""
    if r.indices is not None:
        lse = getattr(r, "logsumexp", None)
        if lse is None:
            raise StipError("logprobs on the top-k downlink need the server's logsumexp (STIP protocol 2); "
                            "this server does not send it: use the logits downlink")
        ids = to_numpy(bundle.plain_ids(to_numpy(r.indices)[-1]))
        lp = to_numpy(r.values)[-1].astype(np.float32) - np.float32(to_numpy(lse)[-1])
        hit = np.flatnonzero(ids == token)
        if hit.size == 0:
            raise StipError(f"token {token} is not among the {ids.size} the server sent")
        chosen = float(lp[int(hit[0])])
        order = np.argsort(-lp, kind="stable")[:top]
        return TokenLogprob(token, chosen, list(zip(ids[order].tolist(), lp[order].tolist())))
    lp = log_softmax(to_numpy(bundle.plain_logits(to_numpy(r.logits)[-1])))
    return TokenLogprob(token, float(lp[token]), top_of(lp, top))
