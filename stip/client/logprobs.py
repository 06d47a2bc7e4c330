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

import torch

from stip.errors import StipError


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


def step_logprob(bundle, r, token: int, top: int) -> TokenLogprob:
    """The logprob of `token` (the one just picked from reply `r`'s last row) and the `top` most likely tokens."""
    if r.indices is not None:
        lse = getattr(r, "logsumexp", None)
        if lse is None:
            raise StipError("logprobs on the top-k downlink need the server's logsumexp (STIP protocol 2); "
                            "this server does not send it: use the logits downlink")
        ids = bundle.plain_ids(r.indices[-1])
        lp = r.values[-1].float() - float(lse[-1])
        hit = (ids == token).nonzero()
        if hit.numel() == 0:
            raise StipError(f"token {token} is not among the {ids.numel()} the server sent")
        chosen = float(lp[int(hit[0, 0])])
        order = torch.argsort(lp, descending=True, stable=True)[:top]
        return TokenLogprob(token, chosen, list(zip(ids[order].tolist(), lp[order].tolist())))
    lp = torch.log_softmax(bundle.plain_logits(r.logits[-1]).float(), -1)
    values, ids = torch.topk(lp, top) if top else (lp[:0], torch.empty(0, dtype=torch.long))
    return TokenLogprob(token, float(lp[token]), list(zip(ids.tolist(), values.tolist())))
