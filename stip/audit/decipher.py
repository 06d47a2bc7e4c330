"""Deciphering per-token codes with a public bigram language model: a substitution cipher solved at scale.

A deterministic mode sends the same row for the same token, so a server sees a stream of codes, one per token, and
the code -> token map is one-to-one. The attacker holds public text in the same tokenizer (the tokenizer is
public) and its statistics: unigram and Witten-Bell-smoothed bigram probabilities. The decipherer looks for the
one-to-one map that makes the code stream most likely under that bigram model:

1. seed: codes and public tokens matched by frequency rank; the 64 most frequent codes are refined from a few
   perturbed seeds and the likeliest kept; the others come into play by frequency, doubling each time;
2. round after round, every code is scored against every public token with the current map fixed for its
   neighbours: the exact change in the stream's log-likelihood, which splits into a unigram prior
   (count x log P(t)) and, per context, a sparse evidence term (how much more likely the observed left and right
   neighbours are after and before t than by chance). Each code keeps its `k` best tokens, and a sparse
   one-to-one matching (scipy's `min_weight_full_bipartite_matching`) re-places a random half of the codes (all
   at once would oscillate) for the highest total score;
3. it moves on when a few rounds bring no likelier stream, keeping the map of highest log-likelihood.

Everything is sparse matrices and dense blocks of a few thousand codes, so a million tokens and a 49k vocabulary
take minutes on two cores. Only tokens that occur in the public text can be recovered; `LanguageStats.coverage`
says how many of a stream's tokens that leaves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse

CHUNK = 1024  # codes scored per dense block


class LanguageStats:
    """Unigram and bigram statistics of the attacker's public token stream(s), over the tokens it contains
    ("slots", most frequent first), with the sparse evidence matrices the decipherer scores with."""

    def __init__(self, public: np.ndarray | list[np.ndarray]):
        streams = [np.asarray(s, dtype=np.int64) for s in (public if isinstance(public, list) else [public])]
        flat = np.concatenate(streams)
        tokens, counts = np.unique(flat, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        self.tokens, self.counts = tokens[order], counts[order].astype(np.float64)
        self.slot_of = {int(t): i for i, t in enumerate(self.tokens)}
        v = len(self.tokens)
        lookup = np.full(int(tokens.max()) + 1, -1, dtype=np.int64)
        lookup[self.tokens] = np.arange(v)
        pairs = [(lookup[s[:-1]], lookup[s[1:]]) for s in streams if len(s) > 1]
        a = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros(0, dtype=np.int64)
        b = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros(0, dtype=np.int64)
        big = sparse.coo_matrix((np.ones(len(a)), (a, b)), shape=(v, v)).tocsr()
        big.sum_duplicates()
        self.logp = np.log(self.counts / self.counts.sum())
        self.bigrams = big
        # Witten-Bell: lambda_t = n(t.) / (n(t.) + types(t.)): how much of P(.|t) the bigram counts carry
        out_n = np.asarray(big.sum(1)).ravel()
        out_types = np.diff(big.indptr).astype(np.float64)
        lam = np.where(out_n > 0, out_n / np.maximum(out_n + out_types, 1.0), 0.0)
        self.log_backoff = np.log(np.maximum(1.0 - lam, 1e-12))  # log(1 - lambda_t)
        self.logp_t = torch.from_numpy(self.logp.astype(np.float32))
        self.log_backoff_t = torch.from_numpy(self.log_backoff.astype(np.float32))
        p = np.exp(self.logp)
        coo = big.tocoo()
        t, u, n = coo.row, coo.col, coo.data
        # gain[t, u] = log P(u | t) - log((1 - lambda_t) P(u)) = log(1 + lambda_t P_big(u|t) / ((1 - lambda_t) P(u))):
        # how much likelier u follows t than by chance (0 for bigrams the public text never shows)
        gain = np.log1p(lam[t] * (n / out_n[t]) / (np.exp(self.log_backoff[t]) * p[u]))
        self.gain = sparse.csr_matrix((gain.astype(np.float32), (t, u)), shape=(v, v))
        self.gain_both = sparse.vstack([self.gain.T, self.gain], format="csr")  # [2V, V]: after t, then before

    @property
    def size(self) -> int:
        return len(self.tokens)

    def head(self, n: int) -> "LanguageStats":
        """The same statistics over the n most frequent tokens only (a short stream's codes are mostly frequent
        tokens; scoring every rare token for them would only cost time)."""
        if n >= self.size:
            return self
        out = object.__new__(LanguageStats)
        out.tokens, out.counts, out.logp, out.log_backoff = (a[:n] for a in (self.tokens, self.counts, self.logp,
                                                                            self.log_backoff))
        out.slot_of = {int(t): i for i, t in enumerate(out.tokens)}
        out.gain = self.gain[:n, :n]
        out.gain_both = sparse.vstack([out.gain.T, out.gain], format="csr")
        out.logp_t, out.log_backoff_t = self.logp_t[:n], self.log_backoff_t[:n]
        return out

    def top(self, n: int) -> np.ndarray:
        """The n most frequent tokens of the public text."""
        return self.tokens[:n]

    def coverage(self, ids: np.ndarray) -> float:
        """Share of `ids` (token occurrences) that occur in the public text: the most any decipherment can get."""
        return float(np.isin(ids, self.tokens).mean()) if len(ids) else 0.0

    def log_likelihood(self, t: np.ndarray, u: np.ndarray, weight: np.ndarray) -> float:
        """Sum of weight x log P(u | t) over slot pairs (t, u) (slots, not token ids; -1: no token)."""
        ok = (t >= 0) & (u >= 0)
        t, u, w = t[ok], u[ok], weight[ok]
        gain = np.asarray(self.gain[t, u]).ravel() if len(t) else np.zeros(0)
        return float((w * (self.log_backoff[t] + self.logp[u] + gain)).sum()) - 30.0 * float(weight[~ok].sum())


@dataclass
class CodeStream:
    """The cipher side: codes re-indexed 0..K-1 by count (most frequent first), their counts, and the bigram
    counts within requests (never across two requests)."""

    codes: np.ndarray  # code index -> the original code value
    counts: np.ndarray  # [K]
    bigrams: sparse.csr_matrix  # [K, K]: [a, b] = times code b followed code a
    bigrams_t: sparse.csr_matrix  # its transpose
    streams: list[np.ndarray]  # the requests, in code indices

    @classmethod
    def of(cls, streams: list[np.ndarray]) -> "CodeStream":
        flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in streams]) if streams else np.zeros(0, int)
        values, first, inverse, counts = np.unique(flat, return_index=True, return_inverse=True,
                                                   return_counts=True)
        order = np.lexsort((first, -counts))  # ties by first appearance: code values (labels) never matter
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        idx = rank[inverse]
        bounds = np.cumsum([len(s) for s in streams])[:-1]
        parts = np.split(idx, bounds) if len(streams) else []
        k = len(values)
        a = np.concatenate([p[:-1] for p in parts]) if parts else np.zeros(0, int)
        b = np.concatenate([p[1:] for p in parts]) if parts else np.zeros(0, int)
        big = sparse.coo_matrix((np.ones(len(a), dtype=np.float32), (a, b)), shape=(k, k)).tocsr()
        big.sum_duplicates()
        return cls(values[order], counts[order].astype(np.float64), big, big.T.tocsr(), parts)


def seed_by_rank(stream: CodeStream, stats: LanguageStats) -> np.ndarray:
    """Code index -> slot: the i-th most frequent code to the i-th most frequent public token (-1 past them)."""
    k = len(stream.codes)
    return np.where(np.arange(k) < stats.size, np.arange(k), -1)


def context_onehot(assign: np.ndarray, slots: int) -> sparse.csr_matrix:
    """[codes, slots]: 1 where a code is mapped to a slot."""
    mapped = assign >= 0
    return sparse.csr_matrix((np.ones(int(mapped.sum()), dtype=np.float32),
                              (np.flatnonzero(mapped), assign[mapped])), shape=(len(assign), slots))


def scores(stream: CodeStream, stats: LanguageStats, onehot: sparse.csr_matrix, rows: np.ndarray) -> torch.Tensor:
    """[len(rows), slots]: each code's log-likelihood (up to a per-code constant) if it were each public token,
    with every other code at its current slot (`onehot`, `context_onehot`'s)."""
    right_ctx = stream.bigrams[rows] @ onehot  # [code, u]: u followed the code
    left_ctx = stream.bigrams_t[rows] @ onehot  # [code, u]: u preceded it
    # sum_u right_ctx[c, u] gain[t, u] + left_ctx[c, u] gain[u, t]
    out = torch.from_numpy((sparse.hstack([right_ctx, left_ctx], format="csr") @ stats.gain_both).toarray())
    n_right = torch.from_numpy(np.asarray(stream.bigrams[rows].sum(1), dtype=np.float32).ravel())
    out.addr_(torch.from_numpy(stream.counts[rows].astype(np.float32)), stats.logp_t)  # the unigram prior
    out.addr_(n_right, stats.log_backoff_t)
    return out


def candidates(stream: CodeStream, stats: LanguageStats, assign: np.ndarray, rows: np.ndarray, k: int):
    """(code, slot, score) of each of `rows`' k best slots that no other code outside `rows` holds, and its
    current one, as flat arrays."""
    codes_out, slots_out, score_out = [], [], []
    held = np.zeros(stats.size, dtype=bool)
    held[assign[assign >= 0]] = True
    held[assign[rows][assign[rows] >= 0]] = False
    held_t = torch.from_numpy(held)
    k = min(k, int((~held).sum()))
    onehot = context_onehot(assign, stats.size)
    for start in range(0, len(rows), CHUNK):
        block = rows[start:start + CHUNK]
        s = scores(stream, stats, onehot, block)
        s.masked_fill_(held_t[None, :], -np.inf)
        cur = torch.from_numpy(assign[block])
        best = s.topk(k, dim=1).indices
        both = torch.cat([best, torch.where(cur >= 0, cur, best[:, 0])[:, None]], dim=1)
        codes_out.append(np.repeat(block, both.shape[1]))
        slots_out.append(both.numpy().ravel())
        score_out.append(s.gather(1, both).numpy().ravel())
    if not codes_out:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(codes_out), np.concatenate(slots_out), np.concatenate(score_out)


def one_to_one(assign: np.ndarray, movable: np.ndarray, code, slot, score) -> np.ndarray:
    """The map with the `movable` codes re-placed one-to-one on their candidate edges (slots no other code holds)
    for the highest total score. A movable code may end unmapped (-1: a dummy slot of its own, worse than any of
    its candidates) when its candidates are all taken."""
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    rows = np.flatnonzero(movable)
    if not len(rows):
        return assign
    row_of = np.full(len(assign), -1)
    row_of[rows] = np.arange(len(rows))
    slots, col = np.unique(slot, return_inverse=True)
    r = row_of[code]
    key, first = np.unique(r * len(slots) + col, return_index=True)
    r, col, score = r[first], col[first], score[first].astype(np.float64)
    hi = np.full(len(rows), -np.inf)
    lo = np.full(len(rows), np.inf)
    np.maximum.at(hi, r, score)
    np.minimum.at(lo, r, score)
    cost = hi[r] - score + 1e-3  # per-code shifts leave the best matching unchanged; costs stay > 0
    dummy = hi - lo + 1.0 + 1e-3
    graph = sparse.csr_matrix((np.concatenate([cost, dummy]),
                               (np.concatenate([r, np.arange(len(rows))]),
                                np.concatenate([col, len(slots) + np.arange(len(rows))]))),
                              shape=(len(rows), len(slots) + len(rows)))
    _, matched = min_weight_full_bipartite_matching(graph)
    out = assign.copy()
    out[rows] = np.where(matched < len(slots), slots[np.minimum(matched, len(slots) - 1)], -1)
    return out


def stream_log_likelihood(stream: CodeStream, stats: LanguageStats, assign: np.ndarray) -> float:
    coo = stream.bigrams.tocoo()
    return stats.log_likelihood(assign[coo.row], assign[coo.col], coo.data.astype(np.float64))


def refine(stream: CodeStream, stats: LanguageStats, assign: np.ndarray, play: np.ndarray, rounds: int, k: int,
           share: float, patience: int, rng: np.random.Generator) -> np.ndarray:
    """Rounds in which a random `share` of the codes in play may move while every other code holds still (all
    moving at once oscillates), until `patience` rounds in a row bring no better stream log-likelihood, or
    `rounds`; the best map seen."""
    best, best_ll = assign.copy(), stream_log_likelihood(stream, stats, assign)
    stale = 0
    for _ in range(rounds):
        movable = play & (rng.random(len(assign)) < share)
        code, slot, score = candidates(stream, stats, assign, np.flatnonzero(movable), k)
        assign = one_to_one(assign, movable, code, slot, score)
        ll = stream_log_likelihood(stream, stats, assign)
        if ll > best_ll + 1e-6 * abs(best_ll):
            best, best_ll, stale = assign.copy(), ll, 0
        else:
            stale += 1
            if stale >= patience:
                break
    return best


def first_stage(stream, stats, seed_map, play, rounds, k, share, patience, restarts, rng) -> np.ndarray:
    """The most frequent codes placed from `restarts` starts (the rank seed, then the rank seed with neighbouring
    ranks swapped at random), each refined; the start of highest likelihood wins. These codes carry most of the
    traffic and the evidence for every later code."""
    best, best_ll = None, -np.inf
    for r in range(restarts):
        start = seed_map.copy()
        if r:
            idx = np.flatnonzero(play)
            for i in idx[rng.random(len(idx)) < 0.5]:
                j = min(max(i + int(rng.integers(-4, 5)), 0), idx[-1])
                start[i], start[j] = start[j], start[i]
        got = refine(stream, stats, start, play, rounds, k, share, patience, rng)
        ll = stream_log_likelihood(stream, stats, got)
        if ll > best_ll:
            best, best_ll = got, ll
    return best


def decipher(streams: list[np.ndarray], stats: LanguageStats, first: int = 64, rounds: int = 40, k: int = 24,
             share: float = 0.5, patience: int = 3, restarts: int = 6, seed: int = 0, log=None) -> dict[int, int]:
    """code -> token id (or -1) for every code in `streams` (one array of codes per request), among the public
    text's 4 x (codes) most frequent tokens (at least 4096).

    Codes come into play by frequency, doubling from the `first` most frequent (placed from `restarts` starts):
    the newcomers are placed by their contexts among the codes already mapped (a code not in play gives its
    neighbours no evidence), then at most `rounds` rounds refine every code in play (`refine`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the dense blocks are small: a thread pool costs more than it saves on them
    try:
        return _decipher(streams, stats, first, rounds, k, share, patience, restarts, seed, log)
    finally:
        torch.set_num_threads(threads)


def _decipher(streams, stats, first, rounds, k, share, patience, restarts, seed, log) -> dict[int, int]:
    stream = CodeStream.of(streams)
    n = len(stream.codes)
    stats = stats.head(max(4 * n, 4096))
    rng = np.random.default_rng(seed)
    rank = np.arange(n)
    assign = np.where(rank < min(first, stats.size), rank, -1)
    size = min(first, n)
    assign = first_stage(stream, stats, assign, rank < size, rounds, k, share, patience, restarts, rng)
    while True:
        play = rank < size
        assign[~play] = -1
        new = play & (assign < 0)
        if new.any():
            code, slot, score = candidates(stream, stats, assign, np.flatnonzero(new), k)
            assign = one_to_one(assign, new, code, slot, score)
        assign = refine(stream, stats, assign, play, rounds, k, share, patience, rng)
        if log is not None:
            log(f"{size} codes in play: log-likelihood {stream_log_likelihood(stream, stats, assign):.6g}")
        if size >= n:
            break
        size = min(2 * size, n)
    tokens = np.where(assign >= 0, stats.tokens[np.maximum(assign, 0)], -1)
    return {int(c): int(t) for c, t in zip(stream.codes, tokens)}


def rank_map(streams: list[np.ndarray], stats: LanguageStats) -> dict[int, int]:
    """The baseline: code -> token by frequency rank alone."""
    stream = CodeStream.of(streams)
    slot = seed_by_rank(stream, stats)
    return {int(c): int(stats.tokens[s]) if s >= 0 else -1 for c, s in zip(stream.codes, slot)}


def recovery(mapping: dict[int, int], streams: list[np.ndarray], truth: list[np.ndarray],
             common: np.ndarray) -> dict:
    """The auditor's score: the share of token occurrences decoded right, over all of them and over the rare ones
    (tokens not in `common`, e.g. the public text's 1,000 most frequent: names, numbers), and the rare share."""
    codes = np.concatenate(streams).astype(np.int64)
    ids = np.concatenate(truth).astype(np.int64)
    keys = np.array(sorted(mapping), dtype=np.int64)
    values = np.array([mapping[int(k)] for k in keys], dtype=np.int64)
    pos = np.clip(np.searchsorted(keys, codes), 0, max(len(keys) - 1, 0))
    decoded = np.where(len(keys) and keys[pos] == codes, values[pos] if len(keys) else -1, -1)
    right = decoded == ids
    rare = ~np.isin(ids, common)
    return {"all": float(right.mean()) if len(ids) else 0.0,
            "rare": float(right[rare].mean()) if rare.any() else None,
            "rare_share": float(rare.mean()) if len(ids) else 0.0}
