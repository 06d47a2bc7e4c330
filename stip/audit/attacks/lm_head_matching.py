"""LM-head matching on tied models: the server's LM head is the embedding table in the protected basis (rows in the
secret vocabulary order `pc`), so each input row it receives is (nearly) one of its own LM-head rows. The index of
the nearest row is a per-token code: the server does not learn the token from it, but the same token always gets
the same code, which `frequency` then deciphers. Recovery counts rows whose code is right, i.e. maps to the true
token under the true `pc`. Untied models are skipped: their LM head is not the embedding.
"""

from __future__ import annotations

import time

import torch

from stip.audit.attacks.base import AttackResult
from stip.audit.attacks.common import client_key, is_tied, lm_head, mode_of, nearest_rows, observed, server_tensors

NAME = "lm_head_matching"
TITLE = "LM-head matching (tied models): a per-token code from the server's own LM head"


def codes(ctx) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(code, relative distance) per observed input row: the nearest row of the bundle's LM head. None when the model
    is untied or the bundle has no LM head."""
    if not is_tied(ctx):
        return None
    head = lm_head(server_tensors(ctx.server_dir))
    rows, _ = observed(ctx)
    if head is None or not rows.numel() or head.shape[1] != rows.shape[1]:
        return None
    idx, dist = nearest_rows(rows, head)
    return idx, dist / rows.norm(dim=1).clamp_min(1e-12)


def run(ctx) -> AttackResult:
    t0 = time.perf_counter()
    got = codes(ctx)
    if got is None:
        return AttackResult(NAME, TITLE, None, skipped="the model is untied (its LM head is not the embedding) or "
                            "the bundle has no LM head", seconds=time.perf_counter() - t0)
    idx, rel = got
    truth = torch.cat([ids.long() for ids in ctx.truth.ids])
    right = client_key(ctx.truth.bundle_dir).vocab.perm[idx] == truth
    vocab = int(client_key(ctx.truth.bundle_dir).vocab.perm.numel())
    details = {
        "mode": mode_of(ctx.server_dir), "rows": int(idx.numel()), "distinct_codes": int(idx.unique().numel()),
        "distinct_tokens": int(truth.unique().numel()),
        "exact_match_share": float((rel < 1e-4).float().mean()),  # rows equal to an LM-head row (no noise)
        "median_relative_distance": float(rel.median()), "chance": 1.0 / vocab,
        "note": "a right code is a per-token code, not the token: frequency deciphers the codes",
    }
    return AttackResult(NAME, TITLE, float(right.float().mean()), "tokens (codes)", details, {},
                        time.perf_counter() - t0)
