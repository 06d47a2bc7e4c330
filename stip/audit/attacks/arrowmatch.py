"""ArrowMatch (USENIX Security 2025, "Game of Arrows"): an obfuscated fine-tune's weight vectors ("arrows") keep
their directions, so they can be matched to the public base model's by cosine similarity, one-to-one (the Hungarian
method, scipy's `linear_sum_assignment`), which gives the secret orders; then the exact-level decode runs with what
was matched. Published: more than 98% of weights recovered.

Here the arrows live in the residual space: the LM head's rows (their order is `pc`) and each block's FFN neurons
(the gate and up rows and the down column of one neuron share one secret slot; `--harden ffn` scales up by 2^k and
down by 2^-k, which changes no direction). A bundle arrow is a public one times the residual transform `T`
(received = x T). Starting from an estimate of `T` (the better, by mean matched cosine, of the joint Gram solution of
`gram_congruence` and the LM-head norm pairing of `bundle_mixing`), it alternates: un-transform the bundle's arrows,
match each group (vocabulary rows; each layer's neurons, the three tensors' cosines summed) to the public arrows by
direction, then refit `T` by orthogonal Procrustes on every matched pair of unit arrows. With the final `T`, every
received row times `T^-1` goes to its nearest public embedding row. The model may be a fine-tune (level "base"):
the matching needs directions only to be nearest, not equal.

Recovery is the share of observed tokens decoded; the details give the share of arrows matched to their true origin
(vocabulary rows against `pc`, FFN neurons against each layer's key), per group kind, and how much of `T` was found.

The Gram start uses the first `start_layers` blocks (`T` is the same in every block); the start and the form (norm
weights folded or not) are picked on the first block. A vocabulary larger than `full_vocab` is matched row by row
among the `window` public rows either side in norm rank, not by the Hungarian method (whose cost grows as V^3).

Settings (`ctx.settings["arrowmatch"]`): `rounds` (refit/match rounds, 2), `layers` (blocks used; None: all),
`start_layers` (4), `full_vocab` (4096), `window` (64), `budget_s` (120 s; quick 30 s: groups not reached are left
unmatched).
"""

from __future__ import annotations

import re
import time

import numpy as np
import torch

from stip.audit.attacks.base import AttackResult
from stip.audit.attacks.common import client_key, developer_key, match, mode_of, server_tensors, setting, widened
from stip.audit.attacks.weight_pairs import FORMS, decode_traffic, linear_form, reading_linears, reference_tensors, \
    transform_scores

NAME = "arrowmatch"
TITLE = "ArrowMatch: weight rows matched by direction (Hungarian) to the public base, then the traffic decoded"
_GATE = re.compile(r"^(.*layers\.(\d+)\.)mlp\.gate_proj\.weight$")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def arrow_groups(bundle, ref, form: str, layers) -> list[dict]:
    """Groups of arrows sharing one secret order: {"name", "kind", "layer", "pub": [tensors n x d], "own": [...]}."""
    fold = form == "folded"
    groups = []
    norms = {name: norm for name, norm, _ in reading_linears(bundle)}
    if "lm_head.weight" in ref and "lm_head.weight" in bundle \
            and ref["lm_head.weight"].shape == bundle["lm_head.weight"].shape:  # no head on the server: --head client
        groups.append({"name": "lm_head", "kind": "vocab", "layer": None,
                       "pub": [linear_form(ref, "lm_head.weight", norms["lm_head.weight"], False, fold).float()],
                       "own": [linear_form(bundle, "lm_head.weight", norms["lm_head.weight"], False, fold).float()]})
    for name in bundle:
        m = _GATE.match(name)
        if not m or (layers is not None and int(m.group(2)) >= layers):
            continue
        p, norm = m.group(1), f"{m.group(1)}post_attention_layernorm.weight"
        parts = [(f"{p}mlp.gate_proj.weight", norm), (f"{p}mlp.up_proj.weight", norm), (f"{p}mlp.down_proj.weight",
                                                                                          None)]
        if any(n not in ref or n not in bundle or ref[n].shape != bundle[n].shape for n, _ in parts):
            continue
        pub = [linear_form(ref, n, g, False, fold).float() for n, g in parts[:2]] + [ref[parts[2][0]].T]
        own = [linear_form(bundle, n, g, False, fold).float() for n, g in parts[:2]] + [bundle[parts[2][0]].T]
        groups.append({"name": f"ffn {m.group(2)}", "kind": "ffn", "layer": int(m.group(2)), "pub": pub, "own": own})
    return groups


def match_group(group: dict, inverse: torch.Tensor, full_vocab: int, window: int) -> tuple[torch.Tensor, float]:
    """out[j] = the public arrow matched to bundle arrow j, and the summed cosine of the matched pairs: the Hungarian
    method on the summed cosines; a vocabulary over `full_vocab` rows takes the best of the `window` public rows
    either side in norm rank instead (a rotation keeps norms)."""
    mapped = [o @ inverse for o in group["own"]]
    own, pub = [_unit(m) for m in mapped], [_unit(p) for p in group["pub"]]
    n = own[0].shape[0]
    if group["kind"] != "vocab" or n <= full_vocab:
        cos = sum(o @ p.T for p, o in zip(pub, own)) / len(pub)
        assign = match(-cos)
        return assign, float(cos[torch.arange(n), assign].sum())
    return _match_by_norm_band(own[0], pub[0], mapped[0].norm(dim=1), group["pub"][0].norm(dim=1), window)


def _match_by_norm_band(own: torch.Tensor, pub: torch.Tensor, own_norms: torch.Tensor, pub_norms: torch.Tensor,
                        window: int, block: int = 256) -> tuple[torch.Tensor, float]:
    """Each own unit row's most similar public unit row among those within `window` ranks of its own norm rank: one
    product per block of norm-sorted rows, masked to the band."""
    n = own.shape[0]
    own_order, pub_order = torch.argsort(own_norms), torch.argsort(pub_norms)
    assign, total = torch.empty(n, dtype=torch.long), 0.0
    for start in range(0, n, block):
        stop = min(n, start + block)
        lo, hi = max(0, start - window), min(pub.shape[0], stop + window)
        cos = own[own_order[start:stop]] @ pub[pub_order[lo:hi]].T
        rank_gap = (torch.arange(lo, hi)[None, :] - torch.arange(start, stop)[:, None]).abs()
        cos = cos.masked_fill(rank_gap > window, -2.0)
        best = cos.max(1)
        assign[own_order[start:stop]] = pub_order[lo:hi][best.indices]
        total += float(best.values.sum())
    return assign, total


def match_groups(groups: list[dict], t: torch.Tensor, full_vocab: int = 4096, window: int = 64,
                 deadline: float | None = None) -> tuple[list[torch.Tensor], float]:
    """Every group matched (until the deadline: the rest get None), and the mean cosine of the matched pairs."""
    inverse = torch.linalg.inv(t.double()).float()
    out, cos_sum, n = [], 0.0, 0
    for g in groups:
        if deadline is not None and time.perf_counter() > deadline and out:
            out.append(None)
            continue
        assign, total = match_group(g, inverse, full_vocab, window)
        out.append(assign)
        cos_sum, n = cos_sum + total, n + len(assign)
    return out, cos_sum / max(n, 1)


def refit(groups: list[dict], assigns: list) -> torch.Tensor:
    """Orthogonal Procrustes on every matched pair of unit arrows: min |A T - B| over orthogonal T."""
    cross = sum(_unit(p[s]).T @ _unit(o) for g, s in zip(groups, assigns) if s is not None
                for p, o in zip(g["pub"], g["own"]))
    u, _, vt = torch.linalg.svd(cross.double())
    return u @ vt


def initial_transforms(bundle, ref, layers, deadline: float, seed: int) -> dict[str, torch.Tensor]:
    """Starting points for T: the joint Gram solution and the LM-head norm pairing."""
    from stip.audit.attacks.bundle_mixing import recover_mixing
    from stip.audit.attacks.gram_congruence import recover_transform

    out = {}
    t, _ = recover_transform(bundle, ref, 0.05, layers, deadline, seed, 3)  # T is one for all blocks: a few do
    if t is not None:
        out["gram"] = t
    for form in FORMS:
        entry = [e for e in reading_linears(bundle) if e[0] == "lm_head.weight"]
        if entry and "lm_head.weight" in ref and "lm_head.weight" in bundle \
                and ref["lm_head.weight"].shape == bundle["lm_head.weight"].shape:
            own = linear_form(bundle, *entry[0], form == "folded")
            pub = linear_form(ref, *entry[0], form == "folded")
            d = own.shape[1]
            out[f"norms ({form})"] = recover_mixing(own, pub, max(4096, 2 * d), 3)[0]
    return out


def score_matches(ctx, groups: list[dict], assigns: list[torch.Tensor]) -> dict:
    """Share of arrows matched to their true origin (the auditor's keys), overall and per group kind."""
    truth = {}
    try:
        truth["vocab"] = client_key(ctx.truth.bundle_dir).vocab.perm
        key = developer_key(ctx.truth.bundle_dir)
        for i, layer in enumerate(key.layers):
            truth[i] = layer.ffn.perm
    except Exception as e:  # noqa: BLE001 - a key the scorer cannot read: say so
        return {"rows_matched": None, "note": f"keys not scorable: {e}"}
    per_kind: dict[str, list[int]] = {}
    for g, s in zip(groups, assigns):
        perm = truth.get("vocab" if g["kind"] == "vocab" else g["layer"])
        if s is None or perm is None or perm.shape != s.shape:
            continue
        tally = per_kind.setdefault(g["kind"], [0, 0])
        tally[0] += int((s == perm).sum())
        tally[1] += len(s)
    right, total = sum(a for a, _ in per_kind.values()), sum(b for _, b in per_kind.values())
    return {"rows_matched": right / total if total else None, "rows": total,
            "rows_matched_by_kind": {k: a / b for k, (a, b) in per_kind.items()}}


def run(ctx) -> AttackResult:
    t0 = time.perf_counter()
    if ctx.reference is None:
        return AttackResult(NAME, TITLE, None, skipped="needs the public base weights (reference)", seconds=0.0)
    why = widened(ctx)
    if why:
        return AttackResult(NAME, TITLE, None, skipped=why, seconds=time.perf_counter() - t0)
    rounds, layers = int(setting(ctx, NAME, "rounds", 2)), setting(ctx, NAME, "layers", None)
    sizes = dict(full_vocab=int(setting(ctx, NAME, "full_vocab", 4096)), window=int(setting(ctx, NAME, "window", 64)))
    deadline = t0 + float(setting(ctx, NAME, "budget_s", 120.0, quick=30.0))
    bundle, ref = server_tensors(ctx.server_dir), reference_tensors(ctx.reference)
    start_layers = setting(ctx, NAME, "start_layers", 4)
    start_layers = layers if start_layers is None else min(start_layers, layers or start_layers)
    starts = initial_transforms(bundle, ref, start_layers, deadline, ctx.seed)
    best = None
    for form in FORMS:  # the start and the form: by the mean cosine on the first block (and a small vocabulary)
        groups = arrow_groups(bundle, ref, form, layers)
        few = [g for g in groups if g["kind"] == "ffn" and g["layer"] < 1
               or g["kind"] == "vocab" and g["own"][0].shape[0] <= sizes["full_vocab"]]
        for start, t in starts.items():
            if few and (best is None or time.perf_counter() < deadline):
                cos = match_groups(few, t, **sizes)[1]
                if best is None or cos > best[0]:
                    best = (cos, form, start, t, groups)
    if best is None:
        return AttackResult(NAME, TITLE, None, skipped="no arrows: neither an LM head nor LLaMA-style FFN weights "
                            "in both the bundle and the reference", seconds=time.perf_counter() - t0)
    _, form, start, t, groups = best
    assigns, cos = match_groups(groups, t, **sizes, deadline=deadline)
    history = [cos]
    for _ in range(rounds):
        if time.perf_counter() > deadline:
            break
        t = refit(groups, assigns)
        fresh, cos = match_groups(groups, t, **sizes, deadline=deadline)
        assigns = [new if new is not None else old for new, old in zip(fresh, assigns)]  # time out: keep the last
        history.append(cos)
    details = {"mode": mode_of(ctx.server_dir), "form": form, "start": start, "groups": len(groups),
               "groups_matched": sum(a is not None for a in assigns),
               "mean_matched_cosine": [float(np.round(c, 6)) for c in history],
               **score_matches(ctx, groups, assigns), **transform_scores(ctx, t)}
    share, details["rows_decoded"] = decode_traffic(ctx, t)
    details["chance"] = 1.0 / ctx.reference.get_input_embeddings().weight.shape[0]
    return AttackResult(NAME, TITLE, share, "tokens", details, {}, time.perf_counter() - t0)
