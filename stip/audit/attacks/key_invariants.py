"""Key-invariant products (AloePri's weak points): products of protected tensors in which the mode's keys cancel,
compared with the same products of the public weights.

(a) Embedding times LM head. A received row is `y = x T` and the bundle's LM head is `P (W g) T^-T`, so `y W'^T`
    is `x (W g)^T` with its entries in the secret vocabulary order `pc`: the residual key cancels, and sorting the
    entries cancels `pc`. Each received row's sorted logit profile is matched to the public tokens' (`(E + pos)
    (W g)^T`, sorted; the norm weight folded in or not, whichever fits the first 32 rows better). On a large
    vocabulary, candidates are pruned by the profile's sum and sum of squares (cheap for every token: `x (W g)^T 1`
    and `x (W g)^T (W g) x^T`): the nearest first, then the 8 nearest, then `k`, while none matches within 0.1%.
    Then the vocabulary order: bundle column j is the public column whose values over the decoded rows match
    (Hungarian method on small vocabularies, nearest column otherwise), scored against `pc`.
(b) Path products inside each block (`stip.audit.attacks.path_products`): `Wq^T Wk` per head, `Wo Wv`, `Wdown Wup`,
    where RoPE rotations, V/O's invertible maps and the FFN's scalings cancel, leaving `T^T X T`. Solved jointly like
    `gram_congruence` (every pair stays consistent in every mode here, where Gram matrices lose V and up), then the
    traffic is decoded with `T^-1` and the nearest public embedding row.
Recovery is the better of (a)'s and (b)'s token shares.

Settings (`ctx.settings["key_invariants"]`): `k` (candidates per row when the vocabulary exceeds `full_vocab`, 32),
`full_vocab` (4096), `points` (extremes kept of a long sorted profile, 256), `pc_max_vocab` (8192), `tol` (pair
selection, 0.05), `layers` (blocks used by (b); None: all), `budget_s` (120 s, quick 30 s: (a) runs first, within
half of it, and decodes the rows it reaches; (b) gets the rest for choosing its pairs).
"""

from __future__ import annotations

import time

import torch

from stip.audit.attacks.base import AttackResult
from stip.audit.attacks.common import client_key, match, mode_of, observed, server_tensors, setting, sketch
from stip.audit.attacks.congruence import select, solve
from stip.audit.attacks.path_products import head_shape, product_pairs
from stip.audit.attacks.weight_pairs import (FORMS, column_sums, decode_traffic, linear_form, observed_positions,
                                             paired_linears, reading_linears, reference_tensors, transform_scores,
                                             truth_tokens)

NAME = "key_invariants"
TITLE = "Key-invariant products: embedding x LM head (sorted logit profiles) and per-block path products"


# The head pairings tried: both norms folded in, neither, and the bundle's head as stored beside the public one with
# the final norm folded in (AloePri folds it into its head and leaves a scalar norm `c`, which a received embedding
# row never passes through).
PROFILE_FORMS = FORMS + ("public folded",)


def _heads(bundle, ref, form: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(bundle head, public head) in `form`; the two may differ in width (AloePri's d + 2h: the keys still cancel
    in a received row times the bundle's head), not in vocabulary."""
    entry = [e for e in reading_linears(bundle) if e[0] == "lm_head.weight"]
    if not entry or "lm_head.weight" not in ref or ref["lm_head.weight"].shape[0] != bundle["lm_head.weight"].shape[0]:
        return None
    name, norm, _ = entry[0]
    return (linear_form(bundle, name, norm, False, form == "folded"),
            linear_form(ref, name, norm, False, form in ("folded", "public folded")))


def _candidates(plain_table, pos, head, z, k: int) -> torch.Tensor:
    """[N, k] token ids whose profile sum and sum of squares are nearest each observed profile's."""
    ones, gram = head.sum(0), head.T @ head
    obs = torch.stack([z.sum(1), (z * z).sum(1).clamp_min(1e-30).log()], 1)

    def moments(x):
        return torch.stack([x @ ones, ((x @ gram) * x).sum(1).clamp_min(1e-30).log()], 1)

    shared = moments(plain_table) if pos is None else None  # RoPE: one set for every row
    rows = []
    for i in range(z.shape[0]):
        pub = shared if pos is None else moments(plain_table + pos[i])
        scale = pub.std(0).clamp_min(1e-12)
        rows.append(((pub - obs[i]) / scale).abs().sum(1).topk(min(k, len(pub)), largest=False).indices)
    return torch.stack(rows)


def decode_profiles(ctx, heads, k: int, full_vocab: int, points: int, deadline: float,
                    limit: int | None = None) -> tuple[torch.Tensor, float]:
    """(token ids per observed row, -1 where not reached or past `limit`; mean profile distance of the matches). On a
    large
    vocabulary each row tries its best candidate by moments first, then its 8 best, then all `k`, while none matches
    within 0.1%."""
    head_b, head_r = heads[0].float(), heads[1].float()
    table = ctx.reference.get_input_embeddings().weight.detach().float()
    rows = observed(ctx)[0].float()
    pos = observed_positions(ctx)
    z = rows @ head_b.T
    obs = sketch(z, points)
    v = table.shape[0]
    cands = (torch.arange(v).expand(z.shape[0], v) if v <= full_vocab
             else _candidates(table.double(), None if pos is None else pos.double(), heads[1], z.double(), k))
    stages = [slice(None)] if v <= full_vocab else [slice(0, 1), slice(1, 8), slice(8, None)]
    got, dist = torch.full((z.shape[0],), -1, dtype=torch.long), []
    cache: dict[int, torch.Tensor] = {}

    def profiles(c: torch.Tensor, i: int) -> torch.Tensor:
        if pos is not None:  # learned positions: the profile depends on the row's position
            return sketch((table[c] + pos[i]) @ head_r.T, points)
        need = [int(t) for t in c if int(t) not in cache]  # one public profile per token: computed once
        for start in range(0, len(need), 1024):
            ids = torch.tensor(need[start:start + 1024], dtype=torch.long)
            cache.update(zip(need[start:start + 1024], sketch(table[ids] @ head_r.T, points)))
        return torch.stack([cache[int(t)] for t in c])

    for i in range(z.shape[0] if limit is None else min(limit, z.shape[0])):
        if time.perf_counter() > deadline:
            break
        best, scale = (float("inf"), -1), float(obs[i].abs().sum()) + 1e-12
        for part in stages:
            c = cands[i][part]
            if not len(c) or best[0] / scale < 1e-3:
                break
            d = (profiles(c, i) - obs[i]).abs().sum(1)
            if float(d.min()) < best[0]:
                best = (float(d.min()), int(c[int(d.argmin())]))
        got[i] = best[1]
        dist.append(best[0] / scale)
    return got, float(sum(dist) / len(dist)) if dist else float("inf")


def recover_pc(ctx, heads, got: torch.Tensor, max_vocab: int) -> dict:
    """Bundle LM-head row j -> public row, by the columns of the decoded rows' profiles; scored against pc."""
    head_b, head_r = heads
    v = head_b.shape[0]
    ok = got >= 0
    if v > max_vocab or not bool(ok.any()):
        return {"pc_share": None, "pc_note": f"vocabulary {v} > pc_max_vocab {max_vocab}" if v > max_vocab
                else "no decoded rows"}
    table = ctx.reference.get_input_embeddings().weight.detach().double()
    pos = observed_positions(ctx)
    plain = table[got[ok]] + (0 if pos is None else pos[ok].double())
    own = (observed(ctx)[0][ok].double() @ head_b.T).T  # [V, n]: bundle column j over the decoded rows
    pub = (plain @ head_r.T).T
    cost = torch.cdist(own.float(), pub.float())
    pc = match(cost) if v <= 2048 else cost.argmin(1)
    return {"pc_share": float((pc == client_key(ctx.truth.bundle_dir).vocab.perm).float().mean())}


def attack_products(ctx, bundle, ref, tol: float, layers, deadline: float) -> tuple[float | None, dict]:
    """(b): T from the path products, then the traffic decoded."""
    from stip.audit.attacks.gram_congruence import pick_form

    try:
        shape = head_shape(ctx.reference.config)
    except AttributeError:
        return None, {"note": "not a LLaMA-family config"}
    form = pick_form(lambda f, n: product_pairs(bundle, ref, shape, f, n)[1], tol)
    names, pairs = product_pairs(bundle, ref, shape, form, layers)
    keep, sel = select(pairs, tol, deadline=deadline)
    if len(keep) < 2:
        return None, {"form": form, "note": "fewer than two consistent path products (LLaMA-family blocks only)"}
    t, stats = solve([pairs[k] for k in keep], column_sums(paired_linears(bundle, ref, form, 1)), seed=ctx.seed)
    t = torch.from_numpy(t)
    share, _ = decode_traffic(ctx, t)
    return share, {"form": form, "products": len(names), "kept": len(keep), **sel, **stats,
                   **transform_scores(ctx, t)}

def run(ctx) -> AttackResult:
    t0 = time.perf_counter()
    if ctx.reference is None:
        return AttackResult(NAME, TITLE, None, skipped="needs the public reference weights", seconds=0.0)
    if not ctx.observations:
        return AttackResult(NAME, TITLE, None, skipped="no captured rows", seconds=0.0)
    budget = float(setting(ctx, NAME, "budget_s", 120.0, quick=30.0))
    bundle, ref = server_tensors(ctx.server_dir), reference_tensors(ctx.reference)
    details: dict = {"mode": mode_of(ctx.server_dir)}
    share_a, details["profiles"] = attack_profiles(ctx, bundle, ref, t0 + budget / 2)
    share_b, details["products"] = attack_products(ctx, bundle, ref, float(setting(ctx, NAME, "tol", 0.05)),
                                                   setting(ctx, NAME, "layers", None), t0 + budget)
    details["products"]["recovery"] = share_b
    details["chance"] = 1.0 / ctx.reference.get_input_embeddings().weight.shape[0]
    shares = [s for s in (share_a, share_b) if s is not None]
    why = None if shares else (f"neither part applies: (a) {details['profiles'].get('note', '-')}; "
                               f"(b) {details['products'].get('note', '-')}")
    return AttackResult(NAME, TITLE, max(shares) if shares else None, "tokens", details, {},
                        time.perf_counter() - t0, skipped=why)


def attack_profiles(ctx, bundle, ref, deadline: float) -> tuple[float | None, dict]:
    """(a): the sorted logit profiles of embedding x LM head, then the vocabulary order."""
    fits = {form: heads for form in PROFILE_FORMS if (heads := _heads(bundle, ref, form)) is not None}
    if not fits:
        return None, {"note": "no LM head in both the bundle and the reference"}
    k, full = int(setting(ctx, NAME, "k", 32)), int(setting(ctx, NAME, "full_vocab", 4096))
    points = int(setting(ctx, NAME, "points", 256))
    probe = {form: decode_profiles(ctx, heads, k, full, points, deadline, limit=32)[1] for form, heads in fits.items()}
    form = min(probe, key=lambda f: probe[f])  # the form whose first 32 rows match best decodes them all
    got, distance = decode_profiles(ctx, fits[form], k, full, points, deadline)
    share = float((got == truth_tokens(ctx)).float().mean())
    out = {"form": form, "recovery": share, "rows_reached": int((got >= 0).sum()),
           "mean_profile_distance": distance}
    return share, out | recover_pc(ctx, fits[form], got, int(setting(ctx, NAME, "pc_max_vocab", 8192)))
