"""Solving many congruences `C'_k = T^T C_k T` for one unknown invertible `T` (d x d), given pairs of symmetric
matrices (`C_k` public, `C'_k` from the bundle): the solver behind `gram_congruence` and `key_invariants`.

Why it works for any invertible `T` (orthogonal, orthogonal times diagonal, or dense): with `A = sum w_k C_k` and
`B = sum r_k w_k C_k` (random `r_k`, so that the eigenvalues are distinct), the generalized eigenvectors of `(B, A)`,
normalised to `V^T A V = I`, and those of `(B', A')` satisfy `T V' = V S` with `S` a diagonal of signs: eigenvalues
are the same on both sides, so sorting pairs them. Then `T = V S V'^T A'`. The signs come from every other pair:
`S (V^T C_k V) S = V'^T C'_k V'`, so `s_i s_j` is the sign of the product of the two sides' entries; the leading
eigenvector of the summed products gives `S`. The global sign (`T` and `-T` fit every Gram) is fixed by linear
invariants: a linear whose outputs are only permuted keeps its column sums, `1^T W' = (1^T W) T`.

Which pairs to trust: a pair is congruent (under the unknown `T`) only if the similarity invariants of `A^-1 C`
against an anchor pair `A` (its trace, and that of its square) equal the public ones; pairs that a mode breaks
(`vo`'s scalings on V, `ffn`'s on up) do not, and are dropped.
The estimate is then refined by fixed-point orthogonal Procrustes over all pairs (`T <- polar(sum_k C_k T C'_k)`),
kept only if it fits better (it does when `T` is orthogonal, as in every mode of `stip protect`).
"""

from __future__ import annotations

import time

import numpy as np
import scipy.linalg

Pair = tuple[np.ndarray, np.ndarray]  # (public C, bundle C'), symmetric float64


def _inverse(a: np.ndarray) -> np.ndarray | None:
    """a^-1 for a positive definite `a`, else None."""
    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(a), np.eye(a.shape[0]))
    except np.linalg.LinAlgError:
        return None


def _power_traces(c: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    x = inverse @ c
    return np.array([np.trace(x), float(np.sum(x * x.T))])


def mismatch(pair: Pair, inverses: tuple[np.ndarray, np.ndarray]) -> float:
    """Largest relative gap between tr(X) and tr(X^2) of X = A^-1 C and X' = A'^-1 C': both are similarity
    invariants, so 0 when the pair and the anchor are congruent under one T (one product per side, no eigensolver)."""
    a, b = _power_traces(pair[0], inverses[0]), _power_traces(pair[1], inverses[1])
    return float(np.max(np.abs(b - a) / (np.abs(a) + 1e-30)))


def select(pairs: list[Pair], tol: float, anchors: int = 3, deadline: float | None = None) -> tuple[list[int], dict]:
    """Indices of the pairs congruent under one `T`: those whose invariants against a full-rank anchor pair agree
    within `tol`. Anchors are tried in order until one keeps at least half of the pairs (at most `anchors`); the
    one keeping the most wins."""
    best: tuple[int, float, list[int], int] | None = None
    tried = 0
    for a, anchor in enumerate(pairs):
        if tried >= anchors or (best is not None and (2 * best[0] >= len(pairs) or
                                                      (deadline is not None and time.perf_counter() > deadline))):
            break
        inverses = (_inverse(anchor[0]), _inverse(anchor[1]))
        if inverses[0] is None or inverses[1] is None:
            continue
        tried += 1
        gaps = [0.0 if k == a else mismatch(p, inverses) for k, p in enumerate(pairs)]
        keep = [k for k, g in enumerate(gaps) if g <= tol]
        score = (len(keep), -float(np.sum([gaps[k] for k in keep])))
        if best is None or score > (best[0], best[1]):
            best = (score[0], score[1], keep, a)
    if best is None:
        return [], {"anchor": None}
    return best[2], {"anchor": best[3], "anchors_tried": tried}


def spread(pairs: list, n: int) -> list:
    """At most n of the pairs, evenly spaced (the first and the last included): enough for the signs and the
    refinement, whose cost grows with every pair."""
    if len(pairs) <= n:
        return list(pairs)
    return [pairs[i] for i in np.unique(np.linspace(0, len(pairs) - 1, n).round().astype(int))]


def _semidefinite(c: np.ndarray) -> bool:
    """Whether c is positive semi-definite, up to rounding: a Cholesky factor of c + a tiny ridge exists."""
    try:
        scipy.linalg.cho_factor(c + 1e-9 * (abs(np.trace(c)) / len(c) + 1e-30) * np.eye(len(c)))
        return True
    except np.linalg.LinAlgError:
        return False


def residual(t: np.ndarray, pairs: list[Pair]) -> float:
    """Mean relative misfit |T^T C T - C'| / |C'| over the pairs."""
    return float(np.mean([np.linalg.norm(t.T @ c @ t - c2) / (np.linalg.norm(c2) + 1e-30) for c, c2 in pairs]))


def _combination(pairs: list[Pair], coef: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return sum(k * c for k, (c, _) in zip(coef, pairs)), sum(k * c2 for k, (_, c2) in zip(coef, pairs))


def solve(pairs: list[Pair], sums: list[tuple[np.ndarray, np.ndarray]] | None = None, seed: int = 0,
          rounds: int = 3, sample: int = 8) -> tuple[np.ndarray, dict]:
    """(T, stats) with C'_k = T^T C_k T for every pair; `sums` are (public, bundle) column sums of linears whose
    outputs are only permuted (to fix the global sign). The signs, the refinement and the fit error use `sample`
    pairs spread over the list."""
    if len(pairs) < 2:
        raise ValueError("one pair cannot pin T: at least two are needed")
    rng = np.random.default_rng(seed)
    weights = np.array([1.0 / (np.linalg.norm(c) + 1e-30) for c, _ in pairs])
    # A, the metric, from the positive semi-definite pairs (Gram matrices; path products' symmetric parts are not)
    psd = np.array([_semidefinite(c) for c, _ in pairs], dtype=float)
    if not psd.any():
        raise ValueError("no positive semi-definite pair to build the metric from")
    a, a2 = _combination(pairs, weights * psd)
    b, b2 = _combination(pairs, weights * rng.standard_normal(len(pairs)))
    lam, v = scipy.linalg.eigh(b, a)
    lam2, v2 = scipy.linalg.eigh(b2, a2)
    few = spread(list(zip(weights, pairs)), sample)
    # signs: S G_k S = G'_k, so G_k * G'_k has the sign pattern s s^T
    z = sum(w * w * (v.T @ c @ v) * (v2.T @ c2 @ v2) for w, (c, c2) in few)
    s = np.sign(np.linalg.eigh(z)[1][:, -1])
    s[s == 0] = 1.0
    t = v @ np.diag(s) @ v2.T @ a2
    t, flipped = _global_sign(t, sums)
    stats = {"pairs": len(pairs), "eigenvalue_gap": float(np.median(np.abs(lam2 - lam) / (np.abs(lam) + 1e-12))),
             "fit_error": residual(t, [p for _, p in few]), "sign_flipped": flipped}
    d = t.shape[0]
    stats["orthogonality_error"] = float(np.linalg.norm(t.T @ t - np.eye(d)) / np.sqrt(d))
    refined = refine_orthogonal(t, few, rounds)  # kept only where it fits better (an orthogonal T)
    fit = residual(refined, [p for _, p in few])
    stats["refined"] = fit < stats["fit_error"]
    if stats["refined"]:
        t, stats["fit_error"] = refined, fit
    return t, stats


def _global_sign(t: np.ndarray, sums) -> tuple[np.ndarray, bool]:
    if not sums:
        return t, False
    agree = sum(float((pub @ t) @ own) for pub, own in sums)
    return (-t, True) if agree < 0 else (t, False)


def polar(m: np.ndarray) -> np.ndarray:
    """The orthogonal factor of m (the nearest orthogonal matrix)."""
    u, _, vt = np.linalg.svd(m)
    return u @ vt


def refine_orthogonal(t: np.ndarray, weighted: list[tuple[float, Pair]], rounds: int) -> np.ndarray:
    """Fixed-point orthogonal Procrustes over the (weight, pair)s: min over orthogonal T of sum |T C'_k - C_k T_old|."""
    t = polar(t)
    for _ in range(rounds):
        t = polar(sum(w * w * c @ t @ c2 for w, (c, c2) in weighted))
    return t
