"""Known-plaintext key recovery: the attacker knows k plaintext rows `x` (embedding rows of tokens it knows a user
sent) and the rows `x R` the server received, and solves for the residual transform `R`.

Two estimators, both run, the stronger one counted:
- permutation matching: observed coordinate j is the plaintext coordinate whose k values equal its own (up to
  sign); one pair with distinct values pins nearly all of a signed permutation;
- least squares: `R = pinv(X) Y`, exact for any invertible R once k >= d (minimum-norm short of that).

The pairs are the observed rows of distinct tokens, in arrival order, with the protected model's own plaintext
embedding rows (the known plaintext, which the auditor supplies). Noise added before the transform shows up as a
lower share.
"""

from __future__ import annotations

import time

import torch

from stip.audit.attacks.base import AttackResult
from stip.audit.attacks.common import (client_key, columns_recovered, mode_of, observed, plain_embedding,
                                       residual_matrix, setting)

NAME = "known_plaintext"
TITLE = "Known-plaintext key recovery"


def match_permutation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Estimate R [d, d] as a signed permutation from pairs x [k, d], y [k, d]: each column of y is matched to the
    column of x (or its negation) nearest in L2 over the k pairs."""
    d = x.shape[1]
    xs, ys = x.T.double(), y.T.double()  # [d, k]
    sq_x, sq_y = (xs * xs).sum(1), (ys * ys).sum(1)
    cross = ys @ xs.T  # [d_obs, d_plain]
    plus = sq_y[:, None] + sq_x[None, :] - 2 * cross
    minus = sq_y[:, None] + sq_x[None, :] + 2 * cross
    best_plus, i_plus = plus.min(1)
    best_minus, i_minus = minus.min(1)
    use_minus = best_minus < best_plus
    src = torch.where(use_minus, i_minus, i_plus)
    est = torch.zeros(d, d)
    est[src, torch.arange(d)] = torch.where(use_minus, -1.0, 1.0)
    return est


def least_squares(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """R = pinv(X) Y: the exact R once the k pairs span the space, the minimum-norm fit before."""
    return (torch.linalg.pinv(x.double()) @ y.double()).float()


def run(ctx) -> AttackResult:
    t0 = time.perf_counter()
    rows, owner = observed(ctx)
    x_table = plain_embedding(ctx.truth.bundle_dir)
    if x_table is None and mode_of(ctx.server_dir).get("mode") == "server-decode":
        return AttackResult(NAME, TITLE, None, "key columns", skipped="server-decode bundle: the client sends token "
                            "ids and holds no embedding, so there are no (x, x R) pairs (a (token, row) leak is "
                            "ridge_inversion's attack)", seconds=time.perf_counter() - t0)
    if not rows.numel() or x_table is None:
        return AttackResult(NAME, TITLE, None, "key columns", skipped="no observed rows or no plaintext embedding "
                            "(the known plaintext) in the bundle", seconds=time.perf_counter() - t0)
    # The pairs the attacker is assumed to know: observed rows of distinct tokens, with their plaintext rows.
    ids = torch.cat([ids.long() for ids in ctx.truth.ids]) if ctx.truth.ids else torch.empty(0, dtype=torch.long)
    seen: dict[int, int] = {}
    for i, t in enumerate(ids.tolist()):
        seen.setdefault(t, i)
    order = torch.tensor(sorted(seen.values()), dtype=torch.long)
    d = rows.shape[1]
    max_pairs = int(setting(ctx, NAME, "max_pairs", 2 * d, quick=2 * d))
    order = order[:max_pairs]
    x_all, y_all = x_table[ids[order]], rows[order]
    truth = residual_matrix(client_key(ctx.truth.bundle_dir))

    ks, k = [], 1
    while k < len(order):
        ks.append(k)
        k *= 2
    ks.append(len(order))
    perm_exact, perm_tol, ls_exact, ls_tol = [], [], [], []
    for k in ks:
        e, w = columns_recovered(match_permutation(x_all[:k], y_all[:k]), truth)
        perm_exact.append(e)
        perm_tol.append(w)
        e, w = columns_recovered(least_squares(x_all[:k], y_all[:k]), truth)
        ls_exact.append(e)
        ls_tol.append(w)
    best = [max(a, b) for a, b in zip(perm_tol, ls_tol)]
    first_full = next((k for k, b in zip(ks, best) if b >= 1.0), None)
    details = {
        "pairs_available": len(order), "hidden": d, "mode": mode_of(ctx.server_dir),
        "k": ks, "permutation_exact": perm_exact, "permutation_within_tol": perm_tol,
        "least_squares_exact": ls_exact, "least_squares_within_tol": ls_tol,
        "pairs_for_whole_key": first_full, "share_from_one_pair": best[0],
        "tolerance": "a column counts within tolerance at relative L2 error < 0.05",
    }
    curves = {"key share vs known pairs": {"x": [float(k) for k in ks], "y": best,
                                           "xlabel": "known (x, x R) pairs", "ylabel": "share of R's columns"}}
    return AttackResult(NAME, TITLE, best[-1], "key columns", details, curves, time.perf_counter() - t0)
