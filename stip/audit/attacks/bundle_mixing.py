"""The residual transform recovered from the server bundle's LM head, then the traffic decoded with it: what a
server holding the public weights does to a hardened mode.

With RMSNorm (or LayerNorm) between them, the blocks only commute with an orthogonal change of the residual basis, so
a dense mixing `R` is orthogonal, and the bundle's LM head is `P (W g) R`: the public head `W` (times the final norm
weight `g`, where a hardened mode folds it in), its rows in the secret order `pc`, rotated by `R`. A rotation keeps
row norms, so sorting both heads' rows by norm pairs them up; the rows whose norm is far from its neighbours' pair up
right, and orthogonal Procrustes (one SVD) on those pairs gives `R`. Then every input row the server received,
`x R + noise`, is multiplied by `R^T` and matched to the nearest row of the public embedding table.

No queries are needed for `R`, and the same holds for the paper's permutation (a permutation matrix is orthogonal).
Recovery is the share of observed tokens decoded; the details give the share of `R`'s columns recovered.

Settings (`ctx.settings["bundle_mixing"]`): `pairs` (most isolated norm pairs used, at least 2 d), `rounds`
(inlier refits).
"""

from __future__ import annotations

import time

import torch

from stip.audit.attacks.base import AttackResult
from stip.audit.attacks.common import (columns_recovered, lm_head, mode_of, nearest_rows, observed,
                                       reference_embedding, server_tensors, setting, truth_residual, widened)

NAME = "bundle_mixing"
TITLE = "Residual mixing recovered from the LM head (norm pairing + orthogonal Procrustes), then the traffic decoded"


def reference_heads(model) -> dict[str, torch.Tensor]:
    """The public head rows as a bundle may hold them: as published, and with the final norm's weight folded in."""
    head = model.get_output_embeddings().weight.detach().double()
    out = {"head": head}
    norm = getattr(model.base_model, "norm", None) or getattr(model.base_model, "ln_f", None)
    weight = getattr(norm, "weight", None)
    if weight is not None and weight.shape[0] == head.shape[1]:
        out["head x final norm"] = head * weight.detach().double()
    return out


def procrustes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The orthogonal R minimising |a R - b|."""
    u, _, vt = torch.linalg.svd(a.T @ b)
    return u @ vt


def recover_mixing(head: torch.Tensor, ref: torch.Tensor, pairs: int, rounds: int) -> tuple[torch.Tensor, dict]:
    """(R, stats): rows paired by norm rank, the `pairs` most isolated kept, Procrustes refitted on the inliers."""
    head = head.double()
    nb, nr = head.norm(dim=1), ref.norm(dim=1)
    ob, orr = torch.argsort(nb), torch.argsort(nr)
    sorted_r = nr[orr]
    gap = torch.minimum(torch.diff(sorted_r, prepend=sorted_r[:1] - 1), torch.diff(sorted_r, append=sorted_r[-1:] + 1))
    keep = torch.argsort(gap / sorted_r.clamp_min(1e-12), descending=True)[:min(pairs, len(gap))]
    a, b = ref[orr[keep]], head[ob[keep]]
    inliers = torch.ones(len(keep), dtype=torch.bool)
    r = procrustes(a, b)
    for _ in range(rounds):
        err = (a @ r - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)
        inliers = err <= max(1e-3, 3 * float(err.median()))
        if int(inliers.sum()) < head.shape[1]:
            break
        r = procrustes(a[inliers], b[inliers])
    err = (a @ r - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)
    return r, {"pairs": int(len(keep)), "inliers": int(inliers.sum()), "median_fit_error": float(err.median())}


def run(ctx) -> AttackResult:
    t0 = time.perf_counter()
    head = lm_head(server_tensors(ctx.server_dir))
    table = reference_embedding(ctx)
    if ctx.reference is None or head is None or table is None or ctx.reference.get_output_embeddings() is None:
        return AttackResult(NAME, TITLE, None, skipped="needs the public weights (reference) and an LM head in the "
                            "server bundle", seconds=time.perf_counter() - t0)
    why = widened(ctx)
    if why:
        return AttackResult(NAME, TITLE, None, skipped=why, seconds=time.perf_counter() - t0)
    d = head.shape[1]
    pairs = max(int(setting(ctx, NAME, "pairs", 4096, quick=1024)), 2 * d)
    rounds = int(setting(ctx, NAME, "rounds", 3))
    fits = {}
    for form, ref in reference_heads(ctx.reference).items():
        if ref.shape == head.shape:
            fits[form] = recover_mixing(head, ref, pairs, rounds)
    if not fits:
        return AttackResult(NAME, TITLE, None, skipped="the bundle's LM head and the reference's differ in shape",
                            seconds=time.perf_counter() - t0)
    form = min(fits, key=lambda f: fits[f][1]["median_fit_error"])
    r, stats = fits[form]
    truth_r = truth_residual(ctx.truth.bundle_dir)
    exact, within = columns_recovered(r.float(), truth_r) if truth_r is not None else (None, None)
    details = {"mode": mode_of(ctx.server_dir), "hidden": d, "reference_form": form, **stats,
               "key_columns_exact": exact, "key_columns_within_5pct": within}
    rows, _ = observed(ctx)
    if not rows.numel():
        return AttackResult(NAME, TITLE, None, "tokens", details | {"note": "no observed rows to decode"}, {},
                            time.perf_counter() - t0)
    from stip.audit.attacks.vocab_matching import position_rows

    plain = (rows.double() @ r.T).float()
    starts = [(int(o.meta.get("start", 0)), o.inputs.shape[0]) for o in ctx.observations]
    pos = position_rows(ctx.reference, max(s + n for s, n in starts))
    if pos is not None:  # learned absolute positions (GPT-2): the client added them before the transform
        plain = plain - torch.cat([pos[s:s + n] for s, n in starts])
    got, _ = nearest_rows(plain, table)
    truth = torch.cat([ids.long() for ids in ctx.truth.ids])
    details["chance"] = 1.0 / table.shape[0]
    return AttackResult(NAME, TITLE, float((got == truth).float().mean()), "tokens", details, {},
                        time.perf_counter() - t0)
