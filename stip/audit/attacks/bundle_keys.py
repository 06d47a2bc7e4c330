"""Key recovery from the server bundle alone, against the public weights the model was fine-tuned from: no queries.

A permutation moves values, it does not change them. Every norm weight of the bundle is the reference's indexed by
`p`, and the sorted values of any weight's column (or row) survive every permutation of the other axis, so each
residual dimension, FFN neuron, head dimension and vocabulary row has a signature that can be matched against the
reference's:
- `p`: per residual dim, the values of all norm weights, plus sorted |column| sketches of every linear reading the
  residual stream and sorted |row| sketches of every linear writing it; one-to-one matching;
- per layer: rows of Q, K and V (sorted |row|: in-head sign flips do not matter) and FFN neurons (gate and up rows,
  down columns);
- `pc`: LM-head rows by their sorted values, candidates pruned to rows of similar norm.
In hardened modes (norms folded away, dense mixing) the same procedure runs and gets what it gets.

Settings (`ctx.settings["bundle_keys"]`): `points` (extreme values per sketch), `pc_window` (LM-head candidates
either side in norm rank), `p_layers` (blocks whose linears join the norms for p; None: all).
"""

from __future__ import annotations

import re
import time

import torch

from stip.audit.attacks.base import AttackResult
from stip.audit.attacks.common import (aloepri_knobs, client_key, developer_key, lm_head, match, mode_of,
                                       perm_columns_recovered, residual_matrix, server_tensors, setting, sketch)

NAME = "bundle_keys"
TITLE = "Key recovery from the server bundle and public weights"

# Linears of the residual stream, by name suffix: the axis that is the residual (1: it reads it, 0: writes it).
RESID_AXIS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "gate_proj": 1, "up_proj": 1, "o_proj": 0, "down_proj": 0,
              "c_attn": 0, "c_fc": 0, "lm_head": 1}
# Per-layer spaces (the developer key's names) -> [(linear, axis of that space)]; llama-style naming.
LAYER_SPACES = {
    "attn_q": [("self_attn.q_proj", 0)],
    "attn_k": [("self_attn.k_proj", 0)],
    "attn_v": [("self_attn.v_proj", 0)],
    "ffn": [("mlp.gate_proj", 0), ("mlp.up_proj", 0), ("mlp.down_proj", 1)],
}
_LAYER = re.compile(r"^(.*layers\.(\d+)\.)self_attn\.q_proj\.weight$")


def _standard(groups: list[torch.Tensor]) -> list[torch.Tensor]:
    """Put signature groups on one scale, so that no group dominates the distance by its units."""
    out = []
    for g in groups:
        g = g.float()
        out.append((g - g.mean()) / (g.std() + 1e-12) / g.shape[1] ** 0.5)
    return out


def _match_signatures(bundle: list[torch.Tensor], ref: list[torch.Tensor]) -> torch.Tensor:
    """out[j] = the reference index matched to bundle index j, over signature groups ([n, f_g] each)."""
    both = _standard([torch.cat([b, r]) for b, r in zip(bundle, ref)])
    n = bundle[0].shape[0]
    b = torch.cat([g[:n] for g in both], 1)
    r = torch.cat([g[n:] for g in both], 1)
    return match(torch.cdist(b, r))


def residual_signatures(tensors: dict[str, torch.Tensor], d: int, names: list[str], points: int,
                        layers: int | None):
    """([norm values], [linear sketches]) per residual dim, [d, f] each, for the tensors `names` (linears of the
    first `layers` blocks and the LM head only, when `layers` is set: the norms already pin p, and sketching every
    linear twice is most of the attack's time)."""
    norms, linears = [], []
    for name in names:
        block = re.search(r"layers\.(\d+)\.", name)
        if layers is not None and block and int(block.group(1)) >= layers and tensors[name].dim() == 2:
            continue
        t = tensors[name]
        leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
        if t.dim() == 1 and t.shape[0] == d and re.search(r"norm|ln_", name) and not re.search(r"[qk]_norm", name):
            norms.append(t[:, None])
        elif t.dim() == 2 and leaf in RESID_AXIS and t.shape[RESID_AXIS[leaf]] == d:
            along = t.T if RESID_AXIS[leaf] == 1 else t
            linears.append(sketch(along, points, absolute=True))
    return ([torch.cat(norms, 1)] if norms else []), linears


def recover_p(bundle: dict, ref: dict, d: int, points: int,
              layers: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(p from norms only, p from every signature): p[j] = the reference dim that bundle dim j holds."""
    names = sorted(n for n in bundle if n in ref and bundle[n].shape == ref[n].shape)
    bn, bl = residual_signatures(bundle, d, names, points, layers)
    rn, rl = residual_signatures(ref, d, names, points, layers)
    from_norms = _match_signatures(bn, rn) if bn else None
    from_all = _match_signatures(bn + bl, rn + rl) if bn or bl else None
    return from_norms, from_all


def recover_pc(bundle_head: torch.Tensor, ref_head: torch.Tensor, points: int, window: int) -> torch.Tensor:
    """pc[k] = the reference row that bundle LM-head row k holds: nearest sorted-value sketch among the reference
    rows whose norm rank is within `window` of its own."""
    fb, fr = sketch(bundle_head, points), sketch(ref_head, points)
    nb, nr = bundle_head.norm(dim=1), ref_head.norm(dim=1)
    order = torch.argsort(nr)
    rank = torch.searchsorted(nr[order].contiguous(), nb.contiguous())
    v = ref_head.shape[0]
    offsets = torch.arange(-window, window + 1)
    out = torch.empty(bundle_head.shape[0], dtype=torch.long)
    for start in range(0, bundle_head.shape[0], 1024):
        r = rank[start:start + 1024]
        cand = order[(r[:, None] + offsets[None, :]).clamp(0, v - 1)]  # [n, 2W+1]
        dist = (fr[cand] - fb[start:start + 1024, None, :]).pow(2).sum(-1)
        out[start:start + 1024] = cand.gather(1, dist.argmin(1, keepdim=True)).squeeze(1)
    return out


def recover_layers(bundle: dict, ref: dict, points: int) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer and space: rec[r] = the reference index that bundle index r of that space holds."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for name in bundle:
        m = _LAYER.match(name)
        if not m:
            continue
        prefix, layer = m.group(1), int(m.group(2))
        spaces = {}
        for space, parts in LAYER_SPACES.items():
            bs, rs = [], []
            for linear, axis in parts:
                key = f"{prefix}{linear}.weight"
                if key not in bundle or key not in ref or bundle[key].shape != ref[key].shape:
                    break
                b, r = bundle[key], ref[key]
                bs.append(sketch(b if axis == 0 else b.T, points, absolute=True))
                rs.append(sketch(r if axis == 0 else r.T, points, absolute=True))
            else:
                spaces[space] = _match_signatures(bs, rs)
        out[layer] = spaces
    return out


def _score_layers(rec: dict[int, dict[str, torch.Tensor]], bundle_dir) -> dict:
    try:
        key = developer_key(bundle_dir)
        truth = [layer.spaces(key.geometry) for layer in key.layers]
    except Exception as e:  # a hardened key the scorer cannot read as permutations: say so, do not crash
        return {"skipped": f"developer key not scorable as permutations: {e}"}
    per_layer, per_space, total, right = [], {}, 0, 0
    for layer in sorted(rec):
        got = n = 0
        for space, est in rec[layer].items():
            perm = getattr(truth[layer].get(space), "perm", None)
            if perm is None or perm.shape != est.shape:  # a dense (hardened) transform: no order to recover
                per_space.setdefault(space, [0, 0])
                continue
            ok = int((est == perm).sum())
            got, n = got + ok, n + perm.numel()
            per_space.setdefault(space, [0, 0])
            per_space[space][0] += ok
            per_space[space][1] += perm.numel()
        per_layer.append(got / n if n else 0.0)
        total, right = total + n, right + got
    return {"share": right / total if total else None, "per_layer": per_layer,
            "per_space": {s: (a / b if b else None) for s, (a, b) in per_space.items()}}


def run(ctx) -> AttackResult:
    t0 = time.perf_counter()
    if ctx.reference is None:
        return AttackResult(NAME, TITLE, None, "key entries", skipped="needs the public reference weights",
                            seconds=time.perf_counter() - t0)
    if aloepri_knobs(ctx.server_dir) is not None:
        return AttackResult(NAME, TITLE, None, "key entries", skipped="AloePri's residual key is a dense, non-"
                            "orthogonal map per linear (d -> d + 2h), not a permutation p: there is no p to match "
                            "(the token-recovering attacks measure this mode)", seconds=time.perf_counter() - t0)
    points = int(setting(ctx, NAME, "points", 32))
    window = int(setting(ctx, NAME, "pc_window", 64))
    p_layers = setting(ctx, NAME, "p_layers", 2)  # blocks whose linears join the norms in p's signature
    bundle = server_tensors(ctx.server_dir)
    ref = {k: v.detach().float() for k, v in ctx.reference.state_dict().items()}
    d = ctx.reference.get_input_embeddings().weight.shape[1]
    ckey = client_key(ctx.truth.bundle_dir)
    truth_r = residual_matrix(ckey)

    p_norms, p_all = recover_p(bundle, ref, d, points, p_layers)
    details: dict = {"mode": mode_of(ctx.server_dir), "hidden": d,
                     "norm_vectors_in_bundle": sum(1 for n, t in bundle.items() if t.dim() == 1 and t.shape[0] == d
                                                   and re.search(r"norm|ln_", n))}
    # p[j] = reference dim held by bundle dim j, i.e. R[p[j], j] = 1.
    details["p_share_norms_only"] = None if p_norms is None else perm_columns_recovered(p_norms, None, truth_r)
    p_share = 0.0 if p_all is None else perm_columns_recovered(p_all, None, truth_r)
    details["p_share"] = p_share

    head_b, head_r = lm_head(bundle), ctx.reference.get_output_embeddings()
    if head_b is not None and head_r is not None and head_b.shape == head_r.weight.shape:
        pc = recover_pc(head_b, head_r.weight.detach().float(), 2 * points, window)
        details["pc_share"] = float((pc == ckey.vocab.perm).float().mean())
    else:
        details["pc_share"] = None
    layers = recover_layers(bundle, ref, 2 * points)
    details["layers"] = _score_layers(layers, ctx.truth.bundle_dir) if layers else {"skipped": "no llama-style "
                                                                                               "layer names"}
    details["chance"] = 1.0 / d
    return AttackResult(NAME, TITLE, p_share, "key entries (p)", details, {}, time.perf_counter() - t0)
