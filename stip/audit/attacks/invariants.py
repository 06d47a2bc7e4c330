"""Invariant features: any orthogonal transform of the residual stream (a signed permutation, or dense mixing) keeps
each row's norm and the inner products between the rows of one request.

(a) No weights beyond the public embedding table: each observed input row's norm picks the `k` vocabulary rows of
    nearest norm; then, per request, a coordinate ascent picks among them the assignment whose pairwise inner
    products best match the observed Gram matrix.
(b) With the reference weights: at a captured layer, decode position by position. Candidates are the `k` best of
    (a); the reference model runs each after the decoded prefix (KV cache reused, forward stopped at the layer), and
    the candidate whose hidden state's norm and inner products with the decoded prefix's states best match the
    observed ones is kept.
Recovery is the share of positions decoded exactly; the headline is the better of (a) and (b).

Settings (`ctx.settings["invariants"]`): `k` (candidates per position), `sweeps` (Gram coordinate ascent),
`max_requests` and `max_positions` (for (b)), `layer` (captured layer for (b); default the first), `seconds`.
"""

from __future__ import annotations

import time

import torch

from stip.audit.attacks.base import AttackResult
from stip.audit.attacks.common import mode_of, reference_embedding, setting

NAME = "invariants"
TITLE = "Invariant features: norms and inner products vs the embedding table and candidate hidden states"


def _positions(ctx, n: int) -> torch.Tensor | None:
    from stip.audit.attacks.vocab_matching import position_rows

    return position_rows(ctx.reference, n)


def norm_candidates(rows: torch.Tensor, table: torch.Tensor, pos: torch.Tensor | None, k: int) -> torch.Tensor:
    """[T, k]: per row, the vocabulary ids whose (position-added) embedding norm is nearest the row's."""
    out = []
    plain = table.norm(dim=1)
    for t in range(rows.shape[0]):
        norms = plain if pos is None else (table + pos[t]).norm(dim=1)
        out.append((norms - rows[t].norm()).abs().topk(min(k, len(norms)), largest=False).indices)
    return torch.stack(out)


def gram_assign(rows: torch.Tensor, cands: torch.Tensor, table: torch.Tensor, pos: torch.Tensor | None,
                sweeps: int) -> torch.Tensor:
    """Per request: starting from the nearest norm, re-pick each position's candidate to best fit the observed
    inner products with the other positions' current picks (coordinate ascent)."""
    t_len, k = cands.shape
    vecs = table[cands]  # [T, k, d]
    if pos is not None:
        vecs = vecs + pos[:t_len, None, :]
    gram = rows @ rows.T  # [T, T]: what the transform keeps
    scale = gram.diagonal().clamp_min(1e-12).sqrt()
    pick = torch.zeros(t_len, dtype=torch.long)
    for _ in range(sweeps):
        changed = False
        for t in range(t_len):
            current = vecs[torch.arange(t_len), pick]  # [T, d]
            pred = vecs[t] @ current.T  # [k, T]
            pred[:, t] = (vecs[t] * vecs[t]).sum(1)
            err = ((pred - gram[t]) / (scale[t] * scale)).abs().sum(1)
            best = int(err.argmin())
            changed |= best != int(pick[t])
            pick[t] = best
        if not changed:
            break
    return cands[torch.arange(t_len), pick]


class HiddenDecoder:
    """(b): decodes one request from the observed states after block `layer`, by their norms and inner products."""

    def __init__(self, model, layer: int):
        from stip.audit.attacks.vocab_matching import blocks

        self.model, self.layer, self.block = model, layer, blocks(model)[layer]

    def _states(self, ids: torch.Tensor, cache) -> torch.Tensor:
        from stip.audit.attacks.common import state_after

        return state_after(self.model, self.block, ids, cache).float()

    def _expanded(self, cache, n: int):
        from stip.audit.attacks.common import expanded_cache

        return expanded_cache(cache, self.layer + 1, n)

    @torch.no_grad()
    def decode(self, observed: torch.Tensor, cands: torch.Tensor, deadline: float) -> list[int]:
        from transformers import DynamicCache

        prefix = DynamicCache()
        states: list[torch.Tensor] = []
        decoded: list[int] = []
        for t in range(observed.shape[0]):
            if time.monotonic() > deadline:
                break
            o = observed[t].float()
            # the norm, and the inner products with every earlier position, each relative to its magnitude
            target = torch.cat([o.norm()[None], observed[:t].float() @ o])
            scale = torch.cat([o.norm()[None], o.norm() * observed[:t].float().norm(dim=1)]).clamp_min(1e-12)
            hidden = self._states(cands[t].view(-1, 1), self._expanded(prefix, len(cands[t])) if t else None)
            feats = torch.cat([hidden.norm(dim=1, keepdim=True),
                               hidden @ torch.stack(states).T if states else hidden[:, :0]], 1)
            err = ((feats - target) / scale).abs().sum(1)
            j = int(err.argmin())
            decoded.append(int(cands[t, j]))
            states.append(hidden[j])
            self._states(cands[t, j].view(1, 1), prefix)  # extend the prefix's cache by the pick
        return decoded


def run(ctx) -> AttackResult:
    t0 = time.perf_counter()
    table = reference_embedding(ctx)
    if table is None or not ctx.observations:
        return AttackResult(NAME, TITLE, None, skipped="needs the public embedding table (reference) and observed "
                            "requests", seconds=time.perf_counter() - t0)
    k = int(setting(ctx, NAME, "k", 64, quick=16))
    sweeps = int(setting(ctx, NAME, "sweeps", 4))
    max_requests = int(setting(ctx, NAME, "max_requests", 8, quick=3))
    max_positions = int(setting(ctx, NAME, "max_positions", 48, quick=16))
    seconds = float(setting(ctx, NAME, "seconds", 90.0, quick=20.0))
    truth = [ids.long() for ids in ctx.truth.ids]

    # (a) norms, then Gram refinement, over every observed request (prefills from position 0 and single rows alike)
    norm_right = gram_right = total = 0
    cands_by_req = []
    for obs, ids in zip(ctx.observations, truth):
        start = int(obs.meta.get("start", 0))
        pos = _positions(ctx, start + obs.inputs.shape[0])
        pos = None if pos is None else pos[start:]
        rows = obs.inputs.float()
        cands = norm_candidates(rows, table, pos, k)
        picked = gram_assign(rows, cands, table, pos, sweeps) if rows.shape[0] > 1 else cands[:, 0]
        norm_right += int((cands[:, 0] == ids).sum())
        gram_right += int((picked == ids).sum())
        total += int(ids.numel())
        cands_by_req.append((obs, ids, cands, start))
    details = {"mode": mode_of(ctx.server_dir), "positions_a": total, "k": k,
               "recovery_norm_only": norm_right / total, "recovery_norm_gram": gram_right / total,
               "candidate_recall": sum(int((c == i[:, None]).any(1).sum()) for _, i, c, _ in cands_by_req) / total,
               "chance": 1.0 / table.shape[0]}

    # (b) hidden states at a captured layer, with the reference weights
    layers = sorted(set.intersection(*(set(o.hidden) for o in ctx.observations))) if ctx.observations else []
    layer = setting(ctx, NAME, "layer", layers[0] if layers else None)
    recovery_b = None
    if layer is not None and layer in layers:
        decoder = HiddenDecoder(ctx.reference, int(layer))
        deadline = time.monotonic() + seconds
        right = done = 0
        for obs, ids, cands, start in [r for r in cands_by_req if r[3] == 0][:max_requests]:
            n = min(max_positions, ids.numel())
            got = decoder.decode(obs.hidden[layer][:n], cands[:n], deadline)
            right += int((torch.tensor(got, dtype=torch.long) == ids[: len(got)]).sum())
            done += len(got)
        if done:
            recovery_b = right / done
            details |= {"layer_b": int(layer), "positions_b": done, "recovery_hidden": recovery_b}
    else:
        details["hidden_skipped"] = "no captured hidden states at a common layer"
    recovery = max(details["recovery_norm_gram"], details["recovery_norm_only"], recovery_b or 0.0)
    return AttackResult(NAME, TITLE, recovery, "tokens", details, {}, time.perf_counter() - t0)
