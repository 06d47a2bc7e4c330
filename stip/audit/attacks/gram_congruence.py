"""Gram congruence: the residual transform `T` recovered from the server bundle's weights, jointly over many layers,
then the traffic decoded with it. No queries.

Every linear reading the residual stream (q/k/v, gate/up per layer, the LM head) is `W' = P W T` in the bundle, with
`P` whatever the mode does to its outputs. Where `P` is orthogonal (permutations, RoPE-pair rotations), its Gram
matrix is a congruence of the public one: `W'^T W' = T^T (W^T W) T`, with `W` the public weight (the norm weight
before it folded in where the mode folds it: both forms are tried, the one keeping more consistent pairs wins).
Pairs a mode breaks (V under `vo`, up under `ffn`: non-orthogonal output maps) have a different generalized
spectrum and are dropped. The rest are solved jointly (`stip.audit.attacks.congruence`: generalized eigenvectors of
a random combination against the sum, signs from every pair, orthogonal Procrustes refinement when `T` is
orthogonal), which works for an orthogonal `T`, an orthogonal-times-diagonal one, or any invertible one.

Then every received row times `T^-1` is `x` plus transformed noise, and its nearest row of the public embedding table
is the token. Recovery is the share of observed tokens decoded; the details give how much of `T` was recovered
(columns within 5%, relative error) and the pairs kept.

Settings (`ctx.settings["gram_congruence"]`): `tol` (spectrum mismatch for a pair to be kept, 0.05), `layers`
(blocks whose linears are used; None: all), `budget_s` (time for selecting pairs, 120 s; quick 30 s), `rounds`
(Procrustes refinement iterations, 3). The form is picked on the first block and the LM head.
"""

from __future__ import annotations

import re
import time

import numpy as np
import torch

from stip.audit.attacks.base import AttackResult
from stip.audit.attacks.common import mode_of, server_tensors, setting, widened
from stip.audit.attacks.congruence import select, solve
from stip.audit.attacks.weight_pairs import (FORMS, PERMUTED_OUTPUTS, decode_traffic, paired_linears,
                                             reading_linears, reference_tensors, transform_scores)

NAME = "gram_congruence"
TITLE = "Gram congruence: the residual transform from W'^T W' = T^T (W^T W) T over every layer, then the traffic"

def raw_grams(bundle, ref, layers) -> list[dict]:
    """Per reading linear: both Gram matrices and column sums as stored, and the norm weights before it. Folding a
    norm weight `g` in is then cheap: `(W g)^T (W g) = g (W^T W) g`, and the sums times `g`."""
    reads = {name: norm for name, norm, _ in reading_linears(bundle)}
    out = []
    for name, w, w2 in paired_linears(bundle, ref, "raw", layers):
        norm = reads.get(name)
        out.append({"name": name, "c": (w.T @ w).numpy(), "c2": (w2.T @ w2).numpy(),
                    "g": _vector(ref, norm, w.shape[1]), "g2": _vector(bundle, norm, w.shape[1]),
                    "sum": w.sum(0).numpy(), "sum2": w2.sum(0).numpy()})
    return out


def _vector(tensors, name, d: int) -> np.ndarray | None:
    return tensors[name].double().numpy() if name in tensors and tensors[name].shape == (d,) else None


def gram_pairs(grams: list[dict], form: str, max_layers: int | None = None) -> tuple[list[str], list, list]:
    """(names, (public, bundle) Gram pairs, column-sum pairs of the linears whose outputs are only permuted), in
    `form`."""
    names, pairs, sums = [], [], []
    for e in grams:
        layer = re.search(r"\.(\d+)\.", e["name"])
        if max_layers is not None and layer and int(layer.group(1)) >= max_layers:
            continue
        g = e["g"] if form == "folded" and e["g"] is not None else 1.0
        g2 = e["g2"] if form == "folded" and e["g2"] is not None else 1.0
        names.append(e["name"])
        pairs.append((e["c"] * np.outer(g, g), e["c2"] * np.outer(g2, g2)))
        if e["name"].endswith(PERMUTED_OUTPUTS):
            sums.append((e["sum"] * g, e["sum2"] * g2))
    return names, pairs, sums


def pick_form(pairs_of, tol: float) -> str:
    """The form (norm folded or not) whose first block and LM head keep the larger share of consistent pairs:
    `pairs_of(form, max_layers)` gives that form's pairs."""
    share = {}
    for form in FORMS:
        pairs = pairs_of(form, 1)
        share[form] = len(select(pairs, tol)[0]) / len(pairs) if len(pairs) > 1 else 0.0
    return max(FORMS, key=lambda f: share[f])  # a tie keeps the first, "folded"


def recover_transform(bundle, ref, tol: float, layers, deadline: float, seed: int, rounds: int):
    """(T as a float64 tensor, stats), or (None, stats) when fewer than two pairs are consistent."""
    grams = raw_grams(bundle, ref, layers)
    form = pick_form(lambda f, n: gram_pairs(grams, f, n)[1], tol)
    names, pairs, sums = gram_pairs(grams, form)
    keep, sel = select(pairs, tol, deadline=deadline)
    if len(keep) < 2:
        return None, {"form": form, "note": "fewer than two consistent Gram pairs: T is not pinned"}
    t, stats = solve([pairs[k] for k in keep], sums, seed=seed, rounds=rounds)
    dropped = sorted({names[k].split(".")[-2] for k in range(len(names)) if k not in keep})
    return torch.from_numpy(t), {"form": form, "linears": len(names), "kept": len(keep),
                                 "dropped_kinds": dropped, **sel, **stats}


def run(ctx) -> AttackResult:
    t0 = time.perf_counter()
    if ctx.reference is None:
        return AttackResult(NAME, TITLE, None, skipped="needs the public reference weights", seconds=0.0)
    why = widened(ctx)
    if why:
        return AttackResult(NAME, TITLE, None, skipped=why, seconds=time.perf_counter() - t0)
    tol = float(setting(ctx, NAME, "tol", 0.05))
    layers = setting(ctx, NAME, "layers", None)
    budget = float(setting(ctx, NAME, "budget_s", 120.0, quick=30.0))
    rounds = int(setting(ctx, NAME, "rounds", 3))
    bundle = server_tensors(ctx.server_dir)
    t, stats = recover_transform(bundle, reference_tensors(ctx.reference), tol, layers, t0 + budget, ctx.seed,
                                 rounds)
    details = {"mode": mode_of(ctx.server_dir), **stats}
    if t is None:
        return AttackResult(NAME, TITLE, 0.0, "tokens", details, {}, time.perf_counter() - t0)
    details |= transform_scores(ctx, t)
    share, rows = decode_traffic(ctx, t)
    details["rows_decoded"] = rows
    details["chance"] = 1.0 / ctx.reference.get_input_embeddings().weight.shape[0]
    return AttackResult(NAME, TITLE, share, "tokens", details, {}, time.perf_counter() - t0)
