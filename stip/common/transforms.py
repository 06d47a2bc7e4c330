"""Secret linear transforms of one tensor axis, and the CSPRNG that draws them.

STIP's protection is a product of transforms that cancel in pairs: a layer's output is transformed with `T`, the
next layer's input with the matching `T^-T`, and the model computes the same function. The paper's scheme uses signed
permutations only (a permutation, optionally with sign flips, which covers RoPE's 90-degree pair rotations). The
hardened modes (docs/hardened.md) add `Dense` (an orthogonal or invertible matrix: the residual stream's mixing, each
head's Q/K and V/O mixing), `Scale` (exact power-of-two scalings) and the compositions `Chain` and `BlockDiagonal`.
Every transform speaks of "out" and "in" roles rather than of indexing: with row vectors, "out" maps an activation
`x` of the space to `x @ M`, "in" maps the weights that consume it by `M^-T`, and `matrix()` returns `M`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from stip.common.rng import KeyRng as _NumpyKeyRng


class KeyRng(_NumpyKeyRng):
    """A CSPRNG: the ChaCha20 keystream under a 256-bit seed drawn from `os.urandom` (`stip.common.rng`, numpy
    only), with the draws that return torch tensors.

    A caller may pass its own 32-byte seed (tests do, to reproduce a key); the stream is still cryptographic.
    """

    def permutation(self, n: int) -> torch.Tensor:
        """A uniformly random permutation of range(n): argsort of n random 64-bit words (ties have ~2^-40 odds)."""
        words = np.frombuffer(self.random_bytes(8 * n), dtype=np.uint64)
        return torch.from_numpy(np.argsort(words, kind="stable").astype(np.int64))

    def orthogonal(self, n: int) -> torch.Tensor:
        """A Haar-random [n, n] orthogonal float64 matrix: QR of a Gaussian matrix, columns sign-fixed by R's
        diagonal (without the fix QR's sign convention would bias the draw)."""
        q, r = np.linalg.qr(self.normal(n * n).reshape(n, n))
        return torch.from_numpy(q * np.sign(np.diag(r))[None, :])

    def integers(self, n: int, high: int) -> torch.Tensor:
        """n integers uniform in [0, high), high a power of two at most 256."""
        if high & (high - 1) or high > 256:
            raise ValueError("high must be a power of two <= 256")
        raw = np.frombuffer(self.random_bytes(n), dtype=np.uint8)
        return torch.from_numpy((raw % high).astype(np.int64))


@dataclass(frozen=True)
class SignedPermutation:
    """y = sign * x[perm] along one axis. Orthogonal, so its "in" role (T^-T) equals its "out" role (T)."""

    perm: torch.Tensor
    sign: torch.Tensor | None = None  # None: all +1

    def __len__(self) -> int:
        return int(self.perm.numel())

    def apply(self, t: torch.Tensor, dim: int, role: str = "out") -> torch.Tensor:
        """Transform `t` along `dim`. role "out": t holds outputs or activations of the space; "in": t holds weights
        that consume the space (columns of a `[out, in]` matrix). For orthogonal transforms both are the same op."""
        if role not in ("out", "in"):
            raise ValueError(f"unknown role {role!r}")
        if t.shape[dim] != len(self):
            raise ValueError(f"transform of size {len(self)} applied to axis {dim} of shape {tuple(t.shape)}")
        y = t.index_select(dim, self.perm.to(t.device))
        if self.sign is not None:
            shape = [1] * t.dim()
            shape[dim] = len(self)
            y = y * self.sign.to(device=t.device, dtype=t.dtype).view(shape)
        return y

    def invert(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Undo `apply(.., role="out")`: what a client does to logits it receives."""
        if self.sign is not None:
            shape = [1] * t.dim()
            shape[dim] = len(self)
            t = t * self.sign.to(device=t.device, dtype=t.dtype).view(shape)
        return t.index_select(dim, self.inverse_perm.to(t.device))

    @property
    def inverse_perm(self) -> torch.Tensor:
        inv = torch.empty_like(self.perm)
        inv[self.perm] = torch.arange(len(self), dtype=self.perm.dtype)
        return inv

    def matrix(self) -> torch.Tensor:
        """The [n, n] float64 matrix M with `apply(x, -1) == x @ M`."""
        m = torch.zeros(len(self), len(self), dtype=torch.float64)
        sign = torch.ones(len(self), dtype=torch.float64) if self.sign is None else self.sign.double()
        m[self.perm, torch.arange(len(self))] = sign
        return m

    def is_identity(self) -> bool:
        plain = bool(torch.equal(self.perm, torch.arange(len(self))))
        return plain and (self.sign is None or bool((self.sign > 0).all()))

    def same_as(self, other: "SignedPermutation") -> bool:
        if len(self) != len(other) or not torch.equal(self.perm, other.perm):
            return False
        ones = torch.ones(len(self), dtype=torch.int8)
        a = ones if self.sign is None else self.sign
        b = ones if other.sign is None else other.sign
        return bool(torch.equal(a.to(torch.int8), b.to(torch.int8)))

    @staticmethod
    def concat(parts: list["SignedPermutation"]) -> "SignedPermutation":
        """Block-diagonal composition: part k acts on its own slice of the axis (heads, or q/k/v of a fused layer)."""
        perms, signs, offset = [], [], 0
        for part in parts:
            perms.append(part.perm + offset)
            signs.append(torch.ones(len(part), dtype=torch.int8) if part.sign is None else part.sign.to(torch.int8))
            offset += len(part)
        sign = torch.cat(signs)
        return SignedPermutation(torch.cat(perms), None if bool((sign > 0).all()) else sign)


def rope_pair_rotation(quarter_turns: torch.Tensor, head_dim: int) -> SignedPermutation:
    """Rotate each RoPE pair (j, j + head_dim/2) by quarter_turns[j] * 90 degrees.

    RoPE rotates the same pairs by position-dependent angles; 2-D rotations commute, so applying this one to both Q
    and K keeps q.k unchanged at every position, and it is exact in floating point (swaps and negations only).
    """
    half = head_dim // 2
    if quarter_turns.numel() != half:
        raise ValueError("one rotation per RoPE pair")
    perm = torch.arange(head_dim)
    sign = torch.ones(head_dim, dtype=torch.int8)
    for j, turns in enumerate(quarter_turns.tolist()):
        a, b = j, j + half
        if turns == 1:  # (x_a, x_b) -> (-x_b, x_a)
            perm[a], perm[b], sign[a] = b, a, -1
        elif turns == 2:  # -> (-x_a, -x_b)
            sign[a] = sign[b] = -1
        elif turns == 3:  # -> (x_b, -x_a)
            perm[a], perm[b], sign[b] = b, a, -1
    return SignedPermutation(perm, sign)


def _along(t: torch.Tensor, dim: int, fn) -> torch.Tensor:
    """Apply `fn` (last axis in, last axis out) to axis `dim` of `t`, in float64, returning t's dtype."""
    moved = t.movedim(dim, -1).double()
    return fn(moved).to(t.dtype).movedim(-1, dim).contiguous()


def _check(t: torch.Tensor, dim: int, n: int) -> None:
    if t.shape[dim] != n:
        raise ValueError(f"transform of size {n} applied to axis {dim} of shape {tuple(t.shape)}")


@dataclass(frozen=True)
class Dense:
    """y = x @ M along one axis, M an invertible [n, n] float64 matrix (orthogonal where `orthogonal`: then its "in"
    role is M itself). Not bit-exact: a product through float64 rounds once to the tensor's dtype."""

    m: torch.Tensor
    orthogonal: bool = True

    def __len__(self) -> int:
        return int(self.m.shape[0])

    def _inv(self) -> torch.Tensor:
        return self.m.T if self.orthogonal else self._inverse

    @cached_property
    def _inverse(self) -> torch.Tensor:  # computed once per object (a frozen dataclass still has a __dict__)
        return torch.linalg.inv(self.m.double())

    def apply(self, t: torch.Tensor, dim: int, role: str = "out") -> torch.Tensor:
        if role not in ("out", "in"):
            raise ValueError(f"unknown role {role!r}")
        _check(t, dim, len(self))
        m = self.m if role == "out" else self._inv().T
        return _along(t, dim, lambda x: x @ m.to(x.device))

    def invert(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        inv = self._inv()
        return _along(t, dim, lambda x: x @ inv.to(x.device))

    def matrix(self) -> torch.Tensor:
        return self.m.double()


@dataclass(frozen=True)
class Scale:
    """y = x * 2^k along one axis, k small integers: exact in floating point (barring overflow), its "in" role
    divides by the same powers of two."""

    exponents: torch.Tensor  # int8 [n]

    def __len__(self) -> int:
        return int(self.exponents.numel())

    def _factor(self, sign: int, t: torch.Tensor, dim: int) -> torch.Tensor:
        shape = [1] * t.dim()
        shape[dim] = len(self)
        return torch.pow(2.0, sign * self.exponents.double()).to(device=t.device, dtype=t.dtype).view(shape)

    def apply(self, t: torch.Tensor, dim: int, role: str = "out") -> torch.Tensor:
        if role not in ("out", "in"):
            raise ValueError(f"unknown role {role!r}")
        _check(t, dim, len(self))
        return t * self._factor(1 if role == "out" else -1, t, dim)

    def invert(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t * self._factor(-1, t, dim)

    def matrix(self) -> torch.Tensor:
        return torch.diag(torch.pow(2.0, self.exponents.double()))


@dataclass(frozen=True)
class Chain:
    """`parts[0]`, then `parts[1]`, ...: M = M_0 @ M_1 @ ...; its "in" role is each part's "in" role in order."""

    parts: tuple

    def __len__(self) -> int:
        return len(self.parts[0])

    def apply(self, t: torch.Tensor, dim: int, role: str = "out") -> torch.Tensor:
        for part in self.parts:
            t = part.apply(t, dim, role)
        return t

    def invert(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        for part in reversed(self.parts):
            t = part.invert(t, dim)
        return t

    def matrix(self) -> torch.Tensor:
        m = self.parts[0].matrix()
        for part in self.parts[1:]:
            m = m @ part.matrix()
        return m


@dataclass(frozen=True)
class BlockDiagonal:
    """Part k acts on its own consecutive slice of the axis (a head, or Q/K/V of a fused projection)."""

    parts: tuple

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def _each(self, t: torch.Tensor, dim: int, fn) -> torch.Tensor:
        _check(t, dim, len(self))
        return torch.cat([fn(p, s) for p, s in zip(self.parts, t.split([len(p) for p in self.parts], dim))], dim)

    def apply(self, t: torch.Tensor, dim: int, role: str = "out") -> torch.Tensor:
        if role in ("out", "in") and all(isinstance(p, Dense) for p in self.parts):  # one product, not per block
            _check(t, dim, len(self))
            m = self._dense_out if role == "out" else self._dense_in
            return _along(t, dim, lambda x: x @ m.to(x.device))
        return self._each(t, dim, lambda p, s: p.apply(s, dim, role))

    @cached_property
    def _dense_out(self) -> torch.Tensor:
        return torch.block_diag(*[p.m.double() for p in self.parts])

    @cached_property
    def _dense_in(self) -> torch.Tensor:
        return torch.block_diag(*[p._inv().T for p in self.parts])

    def invert(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return self._each(t, dim, lambda p, s: p.invert(s, dim))

    def matrix(self) -> torch.Tensor:
        return torch.block_diag(*[p.matrix() for p in self.parts])


def pair_rotation_matrix(angles: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The [head_dim, head_dim] float64 rotation turning each RoPE pair (j, j + head_dim/2) by angles[j] radians:
    (x_a, x_b) -> (x_a cos - x_b sin, x_a sin + x_b cos), RoPE's own direction. 2-D rotations commute, so applying it
    to Q's and K's heads keeps q.k at every position, up to rounding."""
    half = head_dim // 2
    if angles.numel() != half:
        raise ValueError("one angle per RoPE pair")
    c, s = torch.cos(angles.double()), torch.sin(angles.double())
    m = torch.zeros(head_dim, head_dim, dtype=torch.float64)
    a, b = torch.arange(half), torch.arange(half) + half
    # row vectors: y = x @ m, so y_a = x_a c - x_b s means m[a, a] = c, m[b, a] = -s
    m[a, a], m[b, a], m[a, b], m[b, b] = c, -s, s, c
    return m


def orthogonal_keeping_ones(rng: KeyRng, n: int) -> torch.Tensor:
    """A random orthogonal [n, n] matrix Q with `ones @ Q == ones` (up to rounding): LayerNorm subtracts the mean,
    which commutes with Q only if Q keeps the all-ones direction. Random on the complement of that direction."""
    basis = torch.cat([torch.ones(n, 1, dtype=torch.float64), rng.orthogonal(n)[:, 1:]], 1)
    u, _ = torch.linalg.qr(basis)  # column 0 is +-ones/sqrt(n); the rest spans its complement
    inner = torch.zeros(n, n, dtype=torch.float64)
    inner[0, 0] = 1.0
    inner[1:, 1:] = rng.orthogonal(n - 1)
    return u @ inner @ u.T
