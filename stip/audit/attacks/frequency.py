"""Frequency and substitution deciphering, no weights: a fixed per-token code (the same token always sends the same
row; on tied models, the nearest LM-head row) is a substitution cipher, and English has statistics.

Codes come from two sources: observed input rows, and on tied models the LM-head codes of `lm_head_matching`. Rows
give a code per distinct row (hashed, byte for byte); where the manifest records client noise (`--noise SIGMA`, so
no row repeats), rows are linked instead: two rows within `link` times the distance two noisy copies of one row are
expected to have (sqrt(2 d) SIGMA rms, rms estimated from the observed rows) share a code (single linkage). Noise
hides the token only once it blurs that line, i.e. once copies of a token are no nearer each other than other
tokens are. The decipherer maps codes to the public text's tokens by frequency rank, then improves the
mapping by a hill-climb on the bigram log-likelihood of the decoded traffic (swaps of two codes' tokens, or of a
code's token with an unused one). Recovery is the share of observed token occurrences decoded right, as a curve
over N, the number of requests used; the headline is the stronger source at the largest N.

Settings (`ctx.settings["frequency"]`): `iters` (hill-climb proposals per N), `max_tokens` (public text used),
`targets` (candidate tokens: the public text's most frequent, at least twice the codes), `link` (the linking
threshold for noisy rows, in expected noisy-copy distances; default 2), `seed`.
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


def linked_codes(ctx, noise: float, link: float) -> tuple[list[np.ndarray], float]:
    """Per request, a code per row where rows carry fresh noise of SIGMA = `noise` (times the rows' rms): rows nearer
    than `link` expected noisy-copy distances are joined (single linkage, union-find). Returns the codes and the
    threshold used."""
    rows = torch.cat([obs.inputs.float() for obs in ctx.observations])
    n, d = rows.shape
    rms = float(rows.pow(2).mean().sqrt()) / (1.0 + noise ** 2) ** 0.5
    threshold = link * (2.0 * d) ** 0.5 * noise * rms
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, n, 1024):
        dist = torch.cdist(rows[start:start + 1024], rows)
        for i, j in torch.nonzero(dist < threshold).tolist():
            a, b = find(start + i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return per_request(ctx, np.array([find(i) for i in range(n)], dtype=np.int64)), threshold


def head_codes(ctx) -> list[np.ndarray] | None:
    from stip.audit.attacks.lm_head_matching import codes

    got = codes(ctx)
    return None if got is None else per_request(ctx, got[0].numpy())


def per_request(ctx, flat: np.ndarray) -> list[np.ndarray]:
    """Codes of all observed rows, in order, split back into one array per request."""
    bounds = np.cumsum([obs.inputs.shape[0] for obs in ctx.observations])[:-1]
    return np.split(flat, bounds)


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


def _purity(codes: list[np.ndarray], truth: list[np.ndarray]) -> float:
    """Auditor's view of a linking: the share of rows whose code's most common true token is their own."""
    flat_c, flat_t = np.concatenate(codes), np.concatenate(truth)
    right = 0
    for c in np.unique(flat_c):
        _, counts = np.unique(flat_t[flat_c == c], return_counts=True)
        right += int(counts.max())
    return right / len(flat_c)


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
    link = float(setting(ctx, NAME, "link", 2.0))
    truth = [ids.long().numpy() for ids in ctx.truth.ids]
    mode = mode_of(ctx.server_dir)
    noise = float(mode.get("noise") or 0.0)
    link_details = {}
    if noise:
        codes, threshold = linked_codes(ctx, noise, link)
        sources = {"rows": codes}
        link_details = {"rows_linked_by": f"distance < {threshold:.4g} ({link:g} x the expected distance of two "
                        f"noisy copies at noise {noise:g})", "link_purity": _purity(codes, truth)}
    else:
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
    curves, details = {}, {"mode": mode, "rows": rows_seen, "distinct_codes": distinct, **link_details,
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
