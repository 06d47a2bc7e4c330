"""Vocabulary matching ("Hidden No More", ICML 2025, arXiv 2505.18332): the attacker holds the plaintext weights the
protected model was fine-tuned from (`ctx.reference`) and decodes what the server saw, position by position.

Sorting a vector undoes any permutation of its entries (sorting absolute values also undoes signs), so the attacker
compares sorted vectors: for position t, with positions < t already decoded, it runs the reference model on each
candidate token and keeps the one whose hidden state at the captured layer is nearest the observed one in sorted-L1.
Two things keep this to minutes on a CPU:

- candidate pruning: the vocabulary is ranked once per position by a cheap score, the sorted-L1 distance of the
  observed *input* row to each (sorted) reference embedding row; the model runs on the top `k` only, widening to
  `k * widen` (up to `k_max`) while the best distance is not below `tol` (relative to the observed row's L1 norm);
- KV reuse: the decoded prefix's cache is kept, expanded to the candidate batch, and the model stops at the attacked
  layer (a hook ends the forward), so each position costs one forward of k single tokens through L + 1 blocks.

The inputs themselves (layer "inputs") are decoded by the cheap score alone. Recovery is the share of observed
positions whose token is decoded exactly, per layer attacked; `recovery` is the best layer's.

Settings (`ctx.settings["vocab_matching"]`, a dict): `k`, `widen`, `k_max`, `tol`, `batch`, `layers` (captured layer
indices to attack; default the first `max_layers`), `max_layers`, `max_requests`, `max_positions` (per request),
`seconds` (time budget for the hidden-state decoding, shared by the layers; what one leaves goes to the next),
`metric` ("auto", "sorted", "sorted_abs": "auto" picks by which one matches the inputs better, so a signed
permutation does not hide tokens).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from stip.audit.attacks.base import AttackResult
from stip.audit.attacks.common import widened

NAME = "vocab_matching"
TITLE = "Vocabulary matching (Hidden No More): sorted-L1 decoding with the plaintext weights"

DEFAULTS = dict(k=64, widen=4, k_max=1024, tol=0.05, batch=256, layers=None, max_layers=2, max_requests=16,
                max_positions=48, seconds=120.0, metric="auto")
QUICK = dict(k=16, k_max=128, max_requests=4, max_positions=16, seconds=20.0)
RANKS = (1, 4, 16, 64, 256, 1024, 4096)  # pruning recall curve: is the true token in the cheap top-k?


def settings(ctx) -> dict:
    out = dict(DEFAULTS)
    if ctx.settings.get("quick"):
        out |= QUICK
    return out | dict(ctx.settings.get(NAME, {}))


def blocks(model) -> torch.nn.ModuleList:
    """The decoder blocks of a transformers causal LM (LLaMA-style `model.layers`, GPT-2's `transformer.h`)."""
    base = model.base_model
    for attr in ("layers", "h", "layer", "blocks"):
        mods = getattr(base, attr, None)
        if isinstance(mods, torch.nn.ModuleList):
            return mods
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}")


def position_rows(model, n: int) -> torch.Tensor | None:
    """Learned absolute position embeddings the model adds to its inputs (GPT-2's `wpe`), or None (RoPE)."""
    wpe = getattr(model.base_model, "wpe", None)
    return None if wpe is None else wpe.weight[:n].detach().float()


def canon(x: torch.Tensor, metric: str) -> torch.Tensor:
    """Sorted entries (or sorted absolute values) along the last axis: what a (signed) permutation cannot change."""
    return (x.abs() if metric == "sorted_abs" else x).sort(dim=-1).values


def l1_to_table(rows: torch.Tensor, table: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """[n, V] L1 distances between canonical rows and a canonical table, in chunks of the table."""
    return torch.cat([torch.cdist(rows, table[i:i + chunk], p=1) for i in range(0, table.shape[0], chunk)], dim=1)


class _Decoder:
    """Decodes one request at one layer with the reference model, reusing the decoded prefix's KV cache."""

    def __init__(self, model, layer: int, metric: str):
        self.model, self.layer, self.metric = model, layer, metric
        self.block = blocks(model)[layer]

    def _run(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """Hidden state after block `layer` for ids [B, 1], appended after `cache` (updated in place)."""
        from stip.audit.attacks.common import state_after

        return state_after(self.model, self.block, ids, cache)

    def _expanded(self, cache, n: int):
        from stip.audit.attacks.common import expanded_cache

        return expanded_cache(cache, self.layer + 1, n)

    @torch.no_grad()
    def decode(self, observed: torch.Tensor, ranking: torch.Tensor, opts: dict, deadline: float) -> list[int]:
        """Token ids for each observed hidden row [T, d] (stops early at `deadline`). `ranking` [T, V]: candidate
        order per position (cheap score)."""
        from transformers import DynamicCache

        prefix = DynamicCache()
        decoded: list[int] = []
        for t in range(observed.shape[0]):
            if time.monotonic() > deadline:
                break
            target = canon(observed[t].float(), self.metric)
            scale = float(target.abs().sum()) or 1.0
            best_id, best_d, tried, k = None, float("inf"), 0, opts["k"]
            while True:
                cands = ranking[t, tried:k]
                for i in range(0, len(cands), opts["batch"]):
                    chunk = cands[i:i + opts["batch"]]
                    hidden = self._run(chunk.view(-1, 1), self._expanded(prefix if t else None, len(chunk)))
                    dist = (canon(hidden.float(), self.metric) - target).abs().sum(-1)
                    j = int(dist.argmin())
                    if float(dist[j]) < best_d:
                        best_id, best_d = int(chunk[j]), float(dist[j])
                tried = k
                if best_d / scale <= opts["tol"] or k >= min(opts["k_max"], ranking.shape[1]) \
                        or time.monotonic() > deadline:  # out of time: keep the best found so far
                    break
                k = min(k * opts["widen"], opts["k_max"], ranking.shape[1])
            decoded.append(best_id)
            self._run(torch.tensor([[best_id]]), prefix)  # extend the prefix cache with the decoded token
        return decoded


def _sequences(ctx, max_requests: int, max_positions: int) -> list[dict]:
    """Observations joined per session in position order (prefill chunks, then decode steps), as requests from
    position 0; truth ids kept beside them for scoring."""
    groups: dict = defaultdict(list)
    for i, obs in enumerate(ctx.observations):
        groups[obs.meta.get("session", f"obs{i}")].append((int(obs.meta.get("start", 0)), i))
    seqs = []
    for parts in groups.values():
        parts.sort()
        if parts[0][0] != 0:  # its prefix was never seen: hidden states cannot be replayed
            continue
        obs = [ctx.observations[i] for _, i in parts]
        layers = set.intersection(*(set(o.hidden) for o in obs))
        seqs.append(dict(
            inputs=torch.cat([o.inputs for o in obs])[:max_positions].float(),
            hidden={layer: torch.cat([o.hidden[layer] for o in obs])[:max_positions].float() for layer in layers},
            truth=torch.cat([ctx.truth.ids[i].view(-1) for _, i in parts])[:max_positions].long()))
        if len(seqs) >= max_requests:
            break
    return seqs


def _pick_metric(inputs: torch.Tensor, table: torch.Tensor) -> str:
    """The canonical form under which the observed inputs sit closest (relatively) to some embedding row."""
    best = {}
    for metric in ("sorted", "sorted_abs"):
        rows = canon(inputs[:32], metric)
        d = l1_to_table(rows, canon(table, metric)).min(dim=1).values / rows.abs().sum(-1).clamp_min(1e-12)
        best[metric] = float(d.mean())
    return min(best, key=best.get)


def _input_ranking(inputs: torch.Tensor, table: torch.Tensor, pos: torch.Tensor | None, metric: str,
                   sorted_table: torch.Tensor) -> torch.Tensor:
    """[T, V] distances of each observed input row to each candidate's reference input row (canonical forms)."""
    if pos is None:
        return l1_to_table(canon(inputs, metric), sorted_table)
    return torch.stack([l1_to_table(canon(inputs[t:t + 1], metric), canon(table + pos[t], metric))[0]
                        for t in range(inputs.shape[0])])


def run(ctx) -> AttackResult:
    start = time.monotonic()
    if ctx.reference is None:
        return AttackResult(NAME, TITLE, None, skipped="needs the public plaintext weights (--reference)")
    why = widened(ctx)
    if why:  # sorted-L1 compares a received row with public rows of the same width
        return AttackResult(NAME, TITLE, None, skipped=why)
    opts = settings(ctx)
    seqs = _sequences(ctx, opts["max_requests"], opts["max_positions"])
    if not seqs:
        return AttackResult(NAME, TITLE, None, skipped="no request was observed from its first position")
    model = ctx.reference.eval()
    table = model.get_input_embeddings().weight.detach().float()
    scale = getattr(model.get_input_embeddings(), "embed_scale", None)  # Gemma scales inside its embedding module
    if scale is not None:
        table = table * float(scale)
    metric = opts["metric"] if opts["metric"] != "auto" else _pick_metric(seqs[0]["inputs"], table)
    sorted_table = canon(table, metric)

    captured = sorted(set.intersection(*(set(s["hidden"]) for s in seqs)))
    layers = [layer for layer in (opts["layers"] if opts["layers"] is not None else captured[: opts["max_layers"]])
              if layer in captured]
    hits: dict[str, list[torch.Tensor]] = defaultdict(list)  # layer name -> per-request [n] bool
    recall = torch.zeros(len(RANKS))
    n_inputs = 0
    rankings = []
    with torch.no_grad():
        for s in seqs:
            pos = position_rows(model, s["inputs"].shape[0])
            dist = _input_ranking(s["inputs"], table, pos, metric, sorted_table)
            rankings.append(dist.argsort(dim=1))
            hits["inputs"].append(rankings[-1][:, 0] == s["truth"])
            true_rank = (dist < dist.gather(1, s["truth"].view(-1, 1))).sum(1)  # scoring only: where truth sits
            recall += torch.tensor([float((true_rank < r).sum()) for r in RANKS])
            n_inputs += len(s["truth"])
        end = time.monotonic() + opts["seconds"]
        for i, layer in enumerate(layers):  # each layer gets an equal share of the time the earlier ones left
            decoder = _Decoder(model, layer, metric)
            deadline = time.monotonic() + (end - time.monotonic()) / (len(layers) - i)
            for s, ranking in zip(seqs, rankings):
                decoded = decoder.decode(s["hidden"][layer], ranking, opts, deadline)
                if decoded:
                    hits[f"layer {layer}"].append(torch.tensor(decoded) == s["truth"][: len(decoded)])
                if time.monotonic() > deadline:
                    break

    per_layer, curves = {}, {}
    for name, parts in hits.items():
        flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)
        per_layer[name] = dict(recovery=float(flat.float().mean()) if len(flat) else None, positions=len(flat),
                               requests=len(parts))
        width = max(len(p) for p in parts) if parts else 0
        by_pos = [float(torch.stack([p[t] for p in parts if len(p) > t]).float().mean()) for t in range(width)]
        curves[f"recovery by position ({name})"] = dict(x=list(range(width)), y=by_pos, xlabel="position",
                                                         ylabel="share of requests decoded right")
    curves["true token within the cheap top-k (inputs' sorted-L1)"] = dict(
        x=list(RANKS), y=(recall / max(n_inputs, 1)).tolist(), xlabel="k", ylabel="share of positions")
    rates = [v["recovery"] for v in per_layer.values() if v["recovery"] is not None]
    return AttackResult(
        NAME, TITLE, max(rates) if rates else None, unit="tokens",
        details=dict(per_layer=per_layer, metric=metric, layers_attacked=layers, layers_captured=captured,
                     settings={k: v for k, v in opts.items()}, literature="97.6-100% of tokens on Llama-3.1-8B and "
                     "Gemma-2-2B under permutations (Hidden No More, arXiv 2505.18332)"),
        curves=curves, seconds=time.monotonic() - start)
