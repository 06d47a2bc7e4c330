"""Secret linear transforms of one tensor axis, and the CSPRNG that draws them.

STIP's protection is a product of transforms that cancel in pairs: a layer's output is transformed with `T`, the
next layer's input with the matching `T^-T`, and the model computes the same function. Today every transform is a
signed permutation (a permutation, optionally with sign flips, which covers RoPE's 90-degree pair rotations); the
`Transform` interface deliberately speaks of "out" and "in" roles rather than of indexing, so that dense orthogonal
mixing or power-of-two scalings can be added as new classes without touching the protection engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms


class KeyRng:
    """A CSPRNG: the ChaCha20 keystream under a 256-bit seed drawn from `os.urandom`.

    A caller may pass its own 32-byte seed (tests do, to reproduce a key); the stream is still cryptographic.
    """

    def __init__(self, seed: bytes | None = None):
        seed = os.urandom(32) if seed is None else seed
        if len(seed) != 32:
            raise ValueError("KeyRng seed must be 32 bytes")
        self._enc = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()

    def random_bytes(self, n: int) -> bytes:
        return self._enc.update(b"\0" * n)

    def permutation(self, n: int) -> torch.Tensor:
        """A uniformly random permutation of range(n): argsort of n random 64-bit words (ties have ~2^-40 odds)."""
        words = np.frombuffer(self.random_bytes(8 * n), dtype=np.uint64)
        return torch.from_numpy(np.argsort(words, kind="stable").astype(np.int64))

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
