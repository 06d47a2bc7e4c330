"""Ridge inversion from leaked pairs: k rows of the captured traffic whose tokens the attacker knows (a leak, or
text it planted), a linear inverter fitted on them, and every other row decoded with it.

The inverter is ridge regression from a received row to the public embedding row of its token (plus the learned
position row on GPT-2), with an intercept; a decoded row's token is the nearest public embedding row. Any fixed
linear transform `T` of the residual stream (a permutation, dense mixing, AloePri's invertible keys) falls to it
once the leaked rows span the space (at least d distinct tokens among them), and noise only blurs the fit. The
leaked pairs are a seeded random sample of the captured rows (with the auditor's ids standing in for what the
attacker knows); the rows not leaked at the largest k are the scored ones, the same for every k. Published: 57%
(Qwen3-4B) to 97% (Llama3-8B) of tokens against AloePri with about 1,024 pairs.

Recovery is the share of scored rows decoded at the largest k; the curve gives it over k = 16, 32, ..., 1024 (capped
by the captured rows, keeping a quarter of them, at least `min_scored`, for scoring). The details also give, per k,
the distinct tokens leaked and the share among scored rows whose token never appears in the leak (what a lookup
table of the leak could not decode).

Settings (`ctx.settings["ridge_inversion"]`): `ks` (the k values; default powers of two from 16 to 1024), `alpha`
(ridge strength, as a fraction of the leaked rows' sum of squares, 1e-6), `min_scored` (32), `budget_s` (60 s;
quick 20 s).
"""

from __future__ import annotations

import time

import torch

from stip.audit.attacks.base import AttackResult
from stip.audit.attacks.common import mode_of, observed, reference_embedding, setting
from stip.audit.attacks.weight_pairs import decode_plain, observed_positions, truth_tokens

NAME = "ridge_inversion"
TITLE = "Ridge inversion from k leaked (token, received row) pairs"
KS = tuple(2 ** i for i in range(4, 11))  # 16 .. 1024


def fit_ridge(rows: torch.Tensor, targets: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) minimising |rows W + b - targets|^2 + lam |W|^2, with lam = alpha * (the rows' sum of squares)."""
    mean_r, mean_t = rows.mean(0), targets.mean(0)
    x, y = rows - mean_r, targets - mean_t
    lam = alpha * float((rows * rows).sum()) + 1e-12
    w = torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)
    return w, mean_t - mean_r @ w


def k_values(n_rows: int, ks, min_scored: int) -> tuple[list[int], int]:
    """The k values to try and the number of scored rows, so that every k leaves the same scored rows."""
    scored = min(n_rows, max(min_scored, n_rows // 4))
    cap = n_rows - scored
    out = sorted({k for k in ks if k <= cap})
    if cap > 0 and (not out or out[-1] < cap) and cap < max(ks):
        out.append(cap)  # the most the capture allows
    return out, scored


def run(ctx) -> AttackResult:
    t0 = time.perf_counter()
    table = reference_embedding(ctx)
    if table is None:
        return AttackResult(NAME, TITLE, None, skipped="needs the public reference weights (its embedding table)")
    ks = [int(k) for k in setting(ctx, NAME, "ks", KS)]
    alpha = float(setting(ctx, NAME, "alpha", 1e-6))
    budget = float(setting(ctx, NAME, "budget_s", 60.0, quick=20.0))
    rows, _ = observed(ctx)
    ids = truth_tokens(ctx)
    if not rows.numel():
        return AttackResult(NAME, TITLE, None, skipped="no captured rows")
    n = rows.shape[0]
    ks, n_scored = k_values(n, ks, int(setting(ctx, NAME, "min_scored", 32)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(ctx.seed))
    scored = order[n - n_scored:]
    positions = observed_positions(ctx)
    targets = table[ids].double() + (0 if positions is None else positions.double())
    xs, ys, unseen_ys, done, distinct = [], [], [], [], []
    for k in ks:
        if time.perf_counter() - t0 > budget:
            break
        leak = order[:k]
        w, b = fit_ridge(rows[leak].double(), targets[leak], alpha)
        got = decode_plain(ctx, rows[scored].double() @ w + b, None if positions is None else positions[scored])
        right = got == ids[scored]
        unseen = ~torch.isin(ids[scored], ids[leak])
        distinct.append(int(ids[leak].unique().numel()))
        xs.append(float(k))
        ys.append(float(right.float().mean()))
        unseen_ys.append(float(right[unseen].float().mean()) if bool(unseen.any()) else None)
        done.append(int(unseen.sum()))
    details = {"mode": mode_of(ctx.server_dir), "rows": n, "scored_rows": n_scored, "ks": xs, "recovery_by_k": ys,
               "distinct_leaked_tokens": distinct, "recovery_unseen_tokens": unseen_ys, "unseen_scored_rows": done,
               "hidden": rows.shape[1],
               "published": "57-97% of tokens against AloePri with ~1,024 pairs (Qwen3-4B .. Llama3-8B)",
               "chance": 1.0 / table.shape[0]}
    if len(xs) < len(ks):
        details["note"] = f"stopped at k = {xs[-1] if xs else 0:.0f}: budget"
    curves = {"tokens vs leaked pairs": {"x": xs, "y": ys, "xlabel": "leaked (token, row) pairs k",
                                         "ylabel": "share of the other rows decoded"}} if xs else {}
    return AttackResult(NAME, TITLE, ys[-1] if ys else None, "tokens", details, curves, time.perf_counter() - t0)
