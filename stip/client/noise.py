"""The noise a `--noise SIGMA` bundle adds to the rows it sends: a function of the context, never fresh per send.

Fresh noise per send can be averaged away: a server that makes the client send the same context k times (by
dropping the socket or forgetting the session, which makes the client replay it; or simply by the client asking
again: n choices, an OpenAI client's retries) averages k noisy copies of each row to noise of SIGMA / sqrt(k).

So the noise of row i is drawn from the CSPRNG (`KeyRng`: ChaCha20) under a seed that is a keyed hash chain over a
per-bundle secret and the token ids 0..i. The same context gets the same noise however often it is sent; two
contexts that first differ at position i get independent noise from row i on. Image features (LLaVA) are placed
over the rows of their image tokens after the noise, as before, so they do not enter the chain.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from stip.common.arrays import to_numpy
from stip.common.rng import KeyRng

_CHAIN, _ROW = b"stip-noise-ctx", b"stip-noise-row"  # blake2b personalisations: the chain and each row's seed


def new_secret() -> bytes:
    """The per-bundle (per process) secret every context's chain starts from."""
    return os.urandom(32)


class NoiseChain:
    """The noise of one context, row by row: `next(ids)` gives the noise of the next len(ids) positions (each row
    N(0, std^2) per coordinate) and advances. A new chain over the same ids gives the same rows."""

    def __init__(self, secret: bytes, std: float, dim: int):
        self._state, self.std, self.dim = secret, float(std), int(dim)
        self.position = 0

    def next(self, ids) -> np.ndarray:
        """Float32 noise [len(ids), dim] for the next positions, whose tokens are `ids`."""
        rows = []
        for token in to_numpy(ids).astype(np.int64).reshape(-1).tolist():
            self._state = hashlib.blake2b(int(token).to_bytes(8, "little", signed=True), key=self._state,
                                          digest_size=32, person=_CHAIN).digest()
            seed = hashlib.blake2b(key=self._state, digest_size=32, person=_ROW).digest()
            rows.append(KeyRng(seed).normal(self.dim))
        self.position += len(rows)
        out = np.stack(rows) if rows else np.zeros((0, self.dim))
        return (out * self.std).astype(np.float32)
