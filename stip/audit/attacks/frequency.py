"""Frequency and substitution deciphering, no weights: a fixed per-token code (the same token always sends the same
row; on tied models, the nearest LM-head row) is a substitution cipher, and English has statistics.

Codes come from two sources: exact-duplicate observed input rows (hashed), and on tied models the LM-head codes of
`lm_head_matching`. The decipherer maps codes to the public text's tokens by frequency rank, then improves the
mapping by a hill-climb on the bigram log-likelihood of the decoded traffic (swaps of two codes' tokens, or of a
code's token with an unused one). Recovery is the share of observed token occurrences decoded right, as a curve
over N, the number of requests used; the headline is the stronger source at the largest N. Where a mode adds
noise, rows stop repeating and the row codes say so (as many codes as rows).

Settings (`ctx.settings["frequency"]`): `iters` (hill-climb proposals per N), `max_tokens` (public text used),
`targets` (candidate tokens: the public text's most frequent, at least twice the codes), `seed`.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from stip.audit.attacks.base import AttackResult
from stip.audit.attacks.common import mode_of, setting

NAME = "frequency"
TITLE = "Frequency and substitution deciphering of per-token codes over N requests"


def row_codes(ctx) -> list[np.ndarray]:
    """Per request, a code per row: equal rows (byte for byte) share a code."""
    table: dict[bytes, int] = {}
    out = []
    for obs in ctx.observations:
        rows = obs.inputs.float().contiguous().numpy()
        out.append(np.array([table.setdefault(r.tobytes(), len(table)) for r in rows], dtype=np.int64))
    return out


def head_codes(ctx) -> list[np.ndarray] | None:
    from stip.audit.attacks.lm_head_matching import codes

    got = codes(ctx)
    if got is None:
        return None
    flat, out, at = got[0].numpy(), [], 0
    for obs in ctx.observations:
        out.append(flat[at:at + obs.inputs.shape[0]])
        at += obs.inputs.shape[0]
    return out


class Decipherer:
    """A substitution decipherer from a public token stream's unigram and bigram statistics."""

    def __init__(self, public_ids: np.ndarray, targets: int):
        tokens, counts = np.unique(public_ids, return_counts=True)
        order = np.argsort(-counts, kind="stable")[:targets]
        self.tokens = tokens[order]
        lookup = np.full(int(tokens.max()) + 1, -1)
        lookup[self.tokens] = np.arange(len(self.tokens))
        m = len(self.tokens)
        a, b = lookup[public_ids[:-1]], lookup[public_ids[1:]]
        keep = (a >= 0) & (b >= 0)
        big = np.zeros((m, m), dtype=np.float32)
        np.add.at(big, (a[keep], b[keep]), 1.0)
        p = counts[order] / counts[order].sum()
        # log P(b | a), Dirichlet-smoothed towards the unigram
        self.logp = np.log((big + p[None, :]) / (big.sum(1, keepdims=True) + 1.0)).astype(np.float32)

    def decipher(self, streams: list[np.ndarray], iters: int, rng: np.random.Generator) -> dict[int, int]:
        """code -> token for every code in `streams`: rank matching, then a hill-climb on the bigram
        log-likelihood of the decoded streams."""
        codes, counts = np.unique(np.concatenate(streams), return_counts=True)
        order = np.argsort(-counts, kind="stable")
        codes = codes[order]
        n, t = len(codes), len(self.tokens)
        m = max(t, n)  # token slots; slots >= t are "no token" (more codes than public tokens)
        logp = np.full((m, m), np.log(1e-9), dtype=np.float32)
        logp[:t, :t] = self.logp
        logp_t = np.ascontiguousarray(logp.T)
        lookup = {int(c): i for i, c in enumerate(codes)}
        big = np.zeros((n, n), dtype=np.float32)  # code bigram counts, codes by frequency rank
        for s in streams:
            if len(s) > 1:
                ix = np.array([lookup[int(c)] for c in s])
                np.add.at(big, (ix[:-1], ix[1:]), 1.0)
        big_t = np.ascontiguousarray(big.T)
        assign = np.arange(m)  # code i (i < n) decodes to token slot assign[i]; rank matching to start

        def local(a: int, b: int) -> float:
            """The log-likelihood terms that involve code a or code b (b >= n: an unused token slot)."""
            mc = assign[:n]
            ta, tb = assign[a], assign[b]
            v = float(big[a] @ logp[ta, mc] + big_t[a] @ logp_t[ta, mc]) - big[a, a] * logp[ta, ta]
            if b < n:
                v += float(big[b] @ logp[tb, mc] + big_t[b] @ logp_t[tb, mc]) - big[b, b] * logp[tb, tb] \
                    - big[a, b] * logp[ta, tb] - big[b, a] * logp[tb, ta]
            return v

        picks = rng.choice(n, size=iters, p=counts[order] / counts.sum())
        near = rng.random(iters) < 0.5
        jumps = rng.integers(-8, 9, size=iters)
        others = rng.integers(0, m, size=iters)
        for a, is_near, jump, other in zip(picks.tolist(), near.tolist(), jumps.tolist(), others.tolist()):
            b = min(max(a + jump, 0), m - 1) if is_near else other
            if a == b:
                continue
            before = local(a, b)
            assign[a], assign[b] = assign[b], assign[a]
            if local(a, b) < before:  # keep improvements (and ties) only
                assign[a], assign[b] = assign[b], assign[a]
        tokens = np.concatenate([self.tokens, np.full(m - t, -1)])
        return {int(c): int(tokens[assign[i]]) for i, c in enumerate(codes)}


def _curve(streams, truth, decipherer, ns, iters, seed) -> list[float]:
    out = []
    for n in ns:
        mapping = decipherer.decipher(streams[:n], iters, np.random.default_rng(seed))
        decoded = np.array([mapping[int(c)] for s in streams[:n] for c in s])
        out.append(float((decoded == np.concatenate(truth[:n])).mean()))
    return out


def run(ctx) -> AttackResult:
    t0 = time.perf_counter()
    if ctx.public_ids is None or not len(ctx.observations):
        return AttackResult(NAME, TITLE, None, skipped="needs public text statistics and observed requests",
                            seconds=time.perf_counter() - t0)
    iters = int(setting(ctx, NAME, "iters", 20000, quick=6000))
    max_tokens = int(setting(ctx, NAME, "max_tokens", 300000))
    targets = int(setting(ctx, NAME, "targets", 4000, quick=512))  # capped below at 2x the codes, above at 6000
    seed = int(setting(ctx, NAME, "seed", ctx.seed))
    truth = [ids.long().numpy() for ids in ctx.truth.ids]
    sources = {"rows": row_codes(ctx)}
    if (heads := head_codes(ctx)) is not None:
        sources["lm_head"] = heads
    rows_seen = int(sum(len(s) for s in sources["rows"]))
    distinct = {name: int(len(np.unique(np.concatenate(s)))) for name, s in sources.items()}
    n_codes = max(distinct.values())
    decipherer = Decipherer(ctx.public_ids[:max_tokens].long().numpy(), min(max(targets, 2 * n_codes), 6000))
    ns, n = [], 1
    while n < len(ctx.observations):
        ns.append(n)
        n *= 2
    ns.append(len(ctx.observations))
    curves, details = {}, {"mode": mode_of(ctx.server_dir), "rows": rows_seen, "distinct_codes": distinct,
                           "distinct_tokens": int(len(np.unique(np.concatenate(truth)))), "requests": ns,
                           "iters": iters}
    best = 0.0
    for name, streams in sources.items():
        if distinct[name] == rows_seen and rows_seen > len(np.unique(np.concatenate(truth))):
            details[f"{name}_note"] = "codes do not repeat (every row is new): nothing to decipher"
        ys = _curve(streams, truth, decipherer, ns, iters, seed)
        details[f"recovery_{name}"] = ys
        curves[f"recovery vs requests ({name} codes)"] = {"x": [float(v) for v in ns], "y": ys,
                                                          "xlabel": "requests N", "ylabel": "tokens decoded right"}
        best = max(best, ys[-1])
    # baseline: every code mapped to the public text's most frequent token
    details["chance_most_frequent"] = float((np.concatenate(truth) == decipherer.tokens[0]).mean())
    return AttackResult(NAME, TITLE, best, "tokens", details, curves, time.perf_counter() - t0)
