"""Prompt log-probabilities (`Client.score`): the model's log-probability of every prompt token given the ones before
it, as OpenAI's and vLLM's `echo` + `logprobs` report them (None for the first token), so a protected model can be
scored (perplexity, multiple choice: lm-eval's `local-completions`).

A server-decode bundle is scored by the server itself: one POST /v1/generate with `prompt_logprobs`
(`stip.client.server_decode.score`; the server sees the permuted ids it sees anyway). A round-trip prompt is
prefilled with positions="all" in chunks of at most the server's `max_all_logits // V` positions on one
session (one KV cache), so a long prompt never needs T x V logits in one step. Two ways to get each position's
logprob, exact either way (float32):
- "targets" (top-k downlink): the client maps each next prompt token through its key to the server's permuted index
  and asks for that logit; per position the server sends it, the row's logsumexp and the top-k pairs:
  8 x k + 8 bytes per prompt token (16 with k = 1). The server then sees the prompt as permuted token ids, which is
  what a server-decode session sends anyway, but more than a round-trip session's embeddings show where the bundle
  adds --noise.
- "logits" (full-logits downlink): every position's V logits come back and the client takes log_softmax itself:
  4 x V bytes per prompt token; the server learns nothing beyond an ordinary prefill.
"""

from __future__ import annotations

import numpy as np

from stip.client.logprobs import TokenLogprob, log_softmax, top_of
from stip.common.arrays import to_numpy
from stip.client.replay import embed_context
from stip.client.session import Downlink
from stip.errors import StipError

METHODS = ("targets", "logits")


def chunk_positions(max_all_logits: int, vocab: int) -> int:
    """Positions per all-positions prefill the server allows (its --max-all-logits over V); at least 1."""
    return max(1, int(max_all_logits) // vocab) if max_all_logits else 1 << 30


def _from_targets(bundle, r, ids: list[int], top: int) -> list[TokenLogprob]:
    """Rows 0..n-2 of a targets reply -> the logprobs of ids[1..n-1] (row p scores token p+1)."""
    out = []
    for p in range(len(ids) - 1):
        lse = np.float32(r.logsumexp[p])
        lp = r.values[p].astype(np.float32) - lse
        alternatives = list(zip(bundle.plain_ids(r.indices[p, :top]).tolist(), lp[:top].tolist())) if top else []
        out.append(TokenLogprob(ids[p + 1], float(r.target_logits[p]) - float(lse), alternatives))
    return out


def _from_logits(bundle, r, ids: list[int], top: int) -> list[TokenLogprob]:
    out = []
    lps = log_softmax(to_numpy(bundle.plain_logits(r.logits[:len(ids) - 1])))
    for p, lp in enumerate(lps):
        out.append(TokenLogprob(ids[p + 1], float(lp[ids[p + 1]]), top_of(lp, top)))
    return out


def score(client, ids: list[int], top: int = 0, method: str | None = None) -> list[TokenLogprob | None]:
    """Per prompt token: None for the first, then its log-probability given the tokens before it and the `top` most
    likely tokens at that position. `method`: "targets" or "logits" (default: the client's downlink kind)."""
    bundle = client.bundle
    if bundle.mode == "server-decode":  # the server scores the ids itself (prompt_logprobs), in one request
        from stip.client import server_decode

        if top < 0:
            raise ValueError(f"top must be >= 0, got {top}")
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("the prompt is empty")
        return server_decode.score(client, ids, top)
    if bundle.mode != "round-trip":
        raise StipError(f"prompt scoring needs a round-trip or server-decode bundle; this one is {bundle.mode}")
    method = method or ("logits" if client.downlink.kind == "logits" else "targets")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if top < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    ids = [int(t) for t in ids]
    if not ids:
        raise ValueError("the prompt is empty")
    if client.max_positions and len(ids) > client.max_positions:
        raise StipError(f"the prompt has {len(ids)} tokens; this model and server take at most "
                        f"{client.max_positions}")
    vocab = bundle.vocab_size
    downlink = Downlink("logits") if method == "logits" else Downlink("topk", min(max(top, 1), vocab))
    step = chunk_positions(getattr(client, "max_all_logits", 0), vocab)
    x = embed_context(bundle, ids, None, bundle.noise_chain())
    nexts = bundle.server_ids(ids[1:]).tolist() + [-1]  # row p is asked for token p+1 (the last row: nothing)
    out: list[TokenLogprob | None] = [None]
    with client.connection.open_session() as session:
        for a in range(0, len(ids), step):
            b = min(a + step, len(ids))
            part = ids[a:min(b + 1, len(ids))]  # the chunk's tokens and the one its last row predicts
            if method == "logits":
                r = session.prefill(x[a:b], positions="all", downlink=downlink)
                out += _from_logits(bundle, r, part, top)
            else:
                aims = np.asarray(nexts[a:b], dtype=np.int64)
                r = session.prefill(x[a:b], positions="all", downlink=downlink, targets=aims)
                out += _from_targets(bundle, r, part, top)
    return out
