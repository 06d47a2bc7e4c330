"""The CSPRNG every secret is drawn from, in numpy only: the ChaCha20 keystream under a 256-bit seed.

This is the part the light client needs (its --noise rows); `stip.common.transforms.KeyRng` adds the draws that
return torch tensors (permutations, orthogonal matrices) for the developer."""

from __future__ import annotations

import os

import numpy as np
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

    def uniform(self, n: int) -> np.ndarray:
        """n float64 numbers uniform in (0, 1), from 53 random bits each."""
        words = np.frombuffer(self.random_bytes(8 * n), dtype=np.uint64)
        return ((words >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)

    def normal(self, n: int) -> np.ndarray:
        """n standard normal float64 numbers (Box-Muller over `uniform`)."""
        m = (n + 1) // 2
        u1, u2 = self.uniform(m), self.uniform(m)
        r = np.sqrt(-2.0 * np.log(u1))
        return np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]
