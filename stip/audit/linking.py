"""Linking noisy rows into per-token codes at production volume (a million rows), as a server would.

With `--noise SIGMA` no row repeats, but two noisy copies of one token lie about `sqrt(2 d) SIGMA rms` apart, far
nearer than two different tokens. The `frequency` attack links every pair of rows within `link` times that
distance (single linkage over all pairs): quadratic, fine for the audit's few hundred rows, not for a million.

`StreamLinker` does it in one pass: each code keeps its first row (its leader). A new row takes the code of its
nearest leader if that leader is within the threshold; the nearest leader is found in a random projection to a few
dozen dimensions (distances shrink alike, and the true leader is a hundred times nearer than any other token's) and
checked in the full space. Rows that match no leader are linked among themselves (single linkage within the batch)
and each group starts a code. For well separated tokens this gives the same codes as single linkage.
"""

from __future__ import annotations

import numpy as np
import torch


def noisy_copy_distance(rows: torch.Tensor, noise: float) -> float:
    """The expected distance of two noisy copies of one row, `sqrt(2 d) SIGMA rms`, with rms estimated from the
    noisy rows themselves (their mean square is rms^2 (1 + SIGMA^2))."""
    d = rows.shape[1]
    rms = float(rows.float().pow(2).mean().sqrt()) / (1.0 + noise ** 2) ** 0.5
    return (2.0 * d) ** 0.5 * noise * rms


def _components(close: torch.Tensor) -> np.ndarray:
    """Connected components of a boolean adjacency matrix [n, n] (union-find): a label per node, the smallest
    member's index."""
    n = close.shape[0]
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in torch.nonzero(torch.triu(close, 1)).tolist():
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.array([find(i) for i in range(n)], dtype=np.int64)


class StreamLinker:
    """Codes for noisy rows fed in batches, in arrival order: `add(rows)` returns one code per row."""

    def __init__(self, dim: int, threshold: float, proj_dim: int = 32, seed: int = 0):
        self.threshold = float(threshold)
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(dim, proj_dim, generator=g) / proj_dim ** 0.5
        self.leaders = torch.empty(0, dim)
        self.leaders_proj = torch.empty(0, proj_dim)
        self.size = 0  # codes so far (leaders in use)

    def _nearest(self, rows: torch.Tensor, candidates: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the nearest leader (searched in the projection among `candidates`, measured in full) and its
        distance (inf with no leaders yet)."""
        if not self.size:
            return torch.full((rows.shape[0],), -1), torch.full((rows.shape[0],), float("inf"))
        lp = self.leaders_proj[:self.size]
        rp = rows @ self.proj
        d2 = (rp * rp).sum(1, keepdim=True) - 2 * rp @ lp.T + (lp * lp).sum(1)[None, :]
        top = d2.topk(min(candidates, self.size), dim=1, largest=False).indices  # [n, c]
        full = (rows[:, None, :] - self.leaders[top]).norm(dim=2)  # [n, c]
        dist, pick = full.min(1)
        return top.gather(1, pick[:, None]).squeeze(1), dist

    def _grow(self, rows: torch.Tensor) -> None:
        need = self.size + rows.shape[0]
        if need > self.leaders.shape[0]:
            cap = max(need, 2 * self.leaders.shape[0], 1024)
            self.leaders = torch.cat([self.leaders, torch.empty(cap - self.leaders.shape[0], self.leaders.shape[1])])
            self.leaders_proj = torch.cat([self.leaders_proj,
                                           torch.empty(cap - self.leaders_proj.shape[0], self.proj.shape[1])])
        self.leaders[self.size:need] = rows
        self.leaders_proj[self.size:need] = rows @ self.proj
        self.size = need

    def add(self, rows: torch.Tensor) -> np.ndarray:
        rows = rows.float()
        nearest, dist = self._nearest(rows)
        codes = np.where((dist < self.threshold).numpy(), nearest.numpy(), -1).astype(np.int64)
        new = np.flatnonzero(codes < 0)
        if len(new):
            fresh = rows[new]
            label = _components(torch.cdist(fresh, fresh) < self.threshold)
            firsts = np.unique(label)  # each group's first row leads it
            code_of = {int(f): self.size + i for i, f in enumerate(firsts)}
            self._grow(fresh[firsts])
            codes[new] = [code_of[int(x)] for x in label]
        return codes
