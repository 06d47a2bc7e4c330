"""Vocabulary matching against a TEE worker: decode `h1 p` (block 0's output, the worker's first body layer's input)
with the public weights, candidates run through block 0.

`vocab_matching` prunes its candidates by comparing the observed *input* row with raw embedding rows; a TEE worker's
input is `h1 p`, block 0's output, which is far from the embedding row (on SmolLM2 the true token ranks around
30,000th of 49,152 that way), so its layer-0 decode starves for the right candidate. Here the pruning table is block
0's output for every vocabulary token alone at position 0 (one forward of block 0 per token, once): a context-free
estimate of `h1`. Two prunings, each followed by the same decode:

- "sorted": each observed row against the table by sorted-L1 (what a permutation cannot change; `metric` "auto"
  picks sorted or sorted-absolute values by which fits): no key needed;
- "key": the residual permutation `p` recovered from the worker's own bundle (blocks 1..L-1 are in `p`:
  `bundle_keys.recover_p`, norms and sorted weight sketches against the public weights), the row un-permuted, then
  ranked by cosine against the table.

The decode is `vocab_matching`'s at layer 0: the top `k` candidates (widening to `k_max` while the best relative
distance is above `tol`) run through block 0 after the decoded prefix (its KV cache) and the nearest to the observed
row in the sorted metric wins. Recovery is the better pruning's share of decoded positions right; the details give
each one's share, the table's own top-1 (no context) and the pruning recall at k = 1..1024, and the row norm's recall
(an invariant of any orthogonal transform) beside them. Settings (`ctx.settings["tee_vocab_matching"]`): `k`,
`widen`, `k_max`, `tol`, `batch`, `table_batch`, `max_requests`, `max_positions`, `seconds` (shared by the
prunings), `metric`, `prunings` (("key", "sorted")).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from stip.audit.attacks.base import AttackResult

NAME = "tee_vocab_matching"
TITLE = "Vocabulary matching at the TEE worker's input: h1 p against candidates run through block 0 (sorted-L1)"

DEFAULTS = dict(k=32, widen=4, k_max=1024, tol=0.01, batch=256, table_batch=512, max_requests=16, max_positions=48,
                seconds=120.0, metric="auto", prunings=("key", "sorted"))
QUICK = dict(k=16, k_max=64, max_requests=4, max_positions=16, seconds=20.0)
RANKS = (1, 4, 16, 64, 256, 1024)


def settings(ctx) -> dict:
    return {**DEFAULTS, **(QUICK if ctx.settings.get("quick") else {}), **dict(ctx.settings.get(NAME) or {})}


def sequences(ctx, max_requests: int, max_positions: int) -> list[dict]:
    """Each session's `h1 p` rows in position order (from position 0), with the truth ids for scoring."""
    groups: dict = defaultdict(list)
    for i, obs in enumerate(ctx.observations):
        groups[obs.meta.get("session", f"obs{i}")].append((int(obs.meta.get("start", 0)), i))
    seqs = []
    for parts in groups.values():
        parts.sort()
        if parts[0][0] != 0:
            continue
        rows = [ctx.observations[i].hidden.get(0, ctx.observations[i].inputs) for _, i in parts]
        seqs.append(dict(h1=torch.cat(rows)[:max_positions].float(),
                         truth=torch.cat([ctx.truth.ids[i].view(-1) for _, i in parts])[:max_positions].long()))
        if len(seqs) >= max_requests:
            break
    return seqs


@torch.no_grad()
def block0_table(model, batch: int) -> torch.Tensor:
    """[V, d]: block 0's output for each vocabulary token alone at position 0."""
    from stip.audit.attacks.common import state_after
    from stip.audit.attacks.vocab_matching import blocks

    block0 = blocks(model)[0]
    vocab = int(model.get_input_embeddings().weight.shape[0])
    out = [state_after(model, block0, torch.arange(a, min(a + batch, vocab)).view(-1, 1), None).float()
           for a in range(0, vocab, batch)]
    return torch.cat(out)


def pick_metric(rows: torch.Tensor, table: torch.Tensor) -> str:
    """"sorted" or "sorted_abs": the one under which the rows sit (relatively) nearest some table row."""
    from stip.audit.attacks.vocab_matching import canon, l1_to_table

    fit = {}
    for metric in ("sorted", "sorted_abs"):
        r = canon(rows[:32], metric)
        fit[metric] = float((l1_to_table(r, canon(table, metric)).min(1).values
                             / r.abs().sum(-1).clamp_min(1e-12)).mean())
    return min(fit, key=fit.get)


def _recall(dist: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per rank in RANKS: how many rows have their true token within the top k of `dist` (scoring only)."""
    true_rank = (dist < dist.gather(1, truth.view(-1, 1))).sum(1)
    return torch.tensor([float((true_rank < k).sum()) for k in RANKS])


def key_from_bundle(ctx) -> torch.Tensor | None:
    """p[j] = the public residual dim that bundle dim j holds, recovered from the worker's bundle (None if not)."""
    from stip.audit.attacks.bundle_keys import recover_p
    from stip.audit.attacks.common import server_tensors

    ref = {k: v.detach().float() for k, v in ctx.reference.state_dict().items()}
    d = int(ctx.reference.get_input_embeddings().weight.shape[1])
    from_norms, from_all = recover_p(server_tensors(ctx.server_dir), ref, d, 32, 2)
    return from_all if from_all is not None else from_norms


def rankings(pruning: str, seqs: list[dict], table: torch.Tensor, metric: str, perm: torch.Tensor | None):
    """Per request, the [T, V] distances of each observed row to each token's table row under one pruning."""
    from stip.audit.attacks.vocab_matching import canon, l1_to_table

    if pruning == "sorted":
        sorted_table = canon(table, metric)
        return [l1_to_table(canon(s["h1"], metric), sorted_table) for s in seqs]
    unit = torch.nn.functional.normalize(table, dim=1)
    out = []
    for s in seqs:
        plain = torch.empty_like(s["h1"])
        plain[:, perm] = s["h1"]  # bundle dim j holds public dim perm[j]
        out.append(-(torch.nn.functional.normalize(plain, dim=1) @ unit.T))
    return out


def _decode(pruning: str, dists: list[torch.Tensor], seqs: list[dict], model, metric: str, opts: dict,
            deadline: float, norms: torch.Tensor) -> dict:
    """One pruning's decode and scores."""
    from stip.audit.attacks.vocab_matching import _Decoder  # vocab_matching's decoder, at layer 0

    decoder = _Decoder(model, 0, metric)
    recall, recall_norm = torch.zeros(len(RANKS)), torch.zeros(len(RANKS))
    table_hits, hits, n = [], [], 0
    for s, dist in zip(seqs, dists):
        ranking = dist.argsort(dim=1)
        table_hits.append(ranking[:, 0] == s["truth"])
        recall += _recall(dist, s["truth"])
        recall_norm += _recall((s["h1"].norm(dim=1)[:, None] - norms[None, :]).abs(), s["truth"])
        n += len(s["truth"])
        if time.monotonic() < deadline:
            decoded = decoder.decode(s["h1"], ranking, opts, deadline)
            if decoded:
                hits.append(torch.tensor(decoded) == s["truth"][:len(decoded)])
    flat = torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)
    return dict(recovery=float(flat.float().mean()) if len(flat) else None, positions=len(flat),
                positions_observed=n, table_top1=float(torch.cat(table_hits).float().mean()),
                recall=dict(zip(map(str, RANKS), (recall / max(n, 1)).tolist())),
                recall_norm=dict(zip(map(str, RANKS), (recall_norm / max(n, 1)).tolist())))


def run(ctx) -> AttackResult:
    start = time.monotonic()
    if ctx.reference is None:
        return AttackResult(NAME, TITLE, None, skipped="needs the public weights (block 0 runs the candidates)")
    opts = settings(ctx)
    seqs = sequences(ctx, opts["max_requests"], opts["max_positions"])
    if not seqs:
        return AttackResult(NAME, TITLE, None, skipped="no request was observed from its first position")
    model = ctx.reference.eval()
    with torch.no_grad():
        table = block0_table(model, opts["table_batch"])
    details: dict = dict(requests=len(seqs), table_seconds=round(time.monotonic() - start, 1), settings=opts)
    metric = opts["metric"] if opts["metric"] != "auto" else pick_metric(seqs[0]["h1"], table)
    details["metric"] = metric
    perm = None
    if "key" in opts["prunings"]:
        try:
            perm = key_from_bundle(ctx)
        except Exception as e:  # noqa: BLE001 - a bundle it cannot read leaves the keyless pruning
            details["key_error"] = f"{type(e).__name__}: {e}"
    prunings = [p for p in opts["prunings"] if p != "key" or perm is not None]
    end = time.monotonic() + opts["seconds"]
    per, curves = {}, {}
    with torch.no_grad():
        for i, pruning in enumerate(prunings):  # each gets an equal share of what the earlier ones left
            deadline = time.monotonic() + (end - time.monotonic()) / (len(prunings) - i)
            per[pruning] = _decode(pruning, rankings(pruning, seqs, table, metric, perm), seqs, model, metric, opts,
                                   deadline, table.norm(dim=1))
            curves[f"true token within the top-k ({pruning} pruning)"] = dict(
                x=list(RANKS), y=list(per[pruning]["recall"].values()), xlabel="k", ylabel="share of positions")
    if perm is not None:
        from stip.audit.attacks.common import client_key, perm_columns_recovered, residual_matrix

        details["key_share"] = perm_columns_recovered(perm, None, residual_matrix(client_key(ctx.truth.bundle_dir)))
    rates = [v["recovery"] for v in per.values() if v["recovery"] is not None]
    details["per_pruning"] = per
    return AttackResult(NAME, TITLE, max(rates) if rates else None, unit="tokens", details=details, curves=curves,
                        seconds=time.monotonic() - start)
