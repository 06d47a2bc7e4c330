"""The client key in numpy: what the data owner's generation path needs of `p` (or `Q`) and `pc`, without torch.

The same key file as `stip.common.keys.ClientKey` reads (checked the same way, `stip.common.key_file`), held as numpy
arrays. The transforms answer in the type they are given: numpy for the light client, torch for the optional
torch paths (encoders, images) and for callers that hold torch tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from stip.common.arrays import like, to_numpy
from stip.common.key_file import fingerprint, read_key_arrays
from stip.errors import KeyMismatchError


@dataclass(frozen=True)
class Permutation:
    """y = sign * x[perm] along one axis (`stip.common.transforms.SignedPermutation`, in numpy)."""

    perm: np.ndarray  # int64
    sign: np.ndarray | None = None  # int8, None: all +1

    def __len__(self) -> int:
        return int(self.perm.size)

    @cached_property
    def inverse_perm(self) -> np.ndarray:
        inv = np.empty_like(self.perm)
        inv[self.perm] = np.arange(len(self), dtype=self.perm.dtype)
        return inv

    def _signs(self, ndim: int, dim: int, dtype) -> np.ndarray:
        shape = [1] * ndim
        shape[dim] = len(self)
        return self.sign.astype(dtype).reshape(shape)

    def apply(self, t, dim: int, role: str = "out"):
        """Transform `t` along `dim` (an orthogonal transform: "out" and "in" are the same op)."""
        if role not in ("out", "in"):
            raise ValueError(f"unknown role {role!r}")
        x = to_numpy(t)
        dim = dim % x.ndim
        if x.shape[dim] != len(self):
            raise ValueError(f"transform of size {len(self)} applied to axis {dim} of shape {tuple(x.shape)}")
        y = np.take(x, self.perm, axis=dim)
        if self.sign is not None:
            y = y * self._signs(x.ndim, dim, y.dtype)
        return like(y, t)

    def invert(self, t, dim: int):
        """Undo `apply(.., role="out")`: what a client does to logits it receives."""
        x = to_numpy(t)
        dim = dim % x.ndim
        if self.sign is not None:
            x = x * self._signs(x.ndim, dim, x.dtype)
        return like(np.take(x, self.inverse_perm, axis=dim), t)

    def matrix(self) -> np.ndarray:
        """The [n, n] float64 matrix M with `apply(x, -1) == x @ M`."""
        m = np.zeros((len(self), len(self)))
        m[self.perm, np.arange(len(self))] = 1.0 if self.sign is None else self.sign.astype(np.float64)
        return m

    def is_identity(self) -> bool:
        return bool(np.array_equal(self.perm, np.arange(len(self)))) and \
            (self.sign is None or bool((self.sign > 0).all()))


@dataclass(frozen=True)
class Mix:
    """y = x @ Q along one axis, Q a dense orthogonal float64 matrix (--harden mix); the product runs in float64 and
    rounds once to the input's dtype, as `stip.common.transforms.Dense` does."""

    m: np.ndarray

    def __len__(self) -> int:
        return int(self.m.shape[0])

    def _along(self, t, dim: int, m: np.ndarray):
        x = to_numpy(t)
        dtype = x.dtype
        y = np.moveaxis(np.moveaxis(x, dim, -1).astype(np.float64) @ m, -1, dim).astype(dtype)
        return like(np.ascontiguousarray(y), t)

    def apply(self, t, dim: int, role: str = "out"):
        if role not in ("out", "in"):
            raise ValueError(f"unknown role {role!r}")
        return self._along(t, dim, self.m)

    def invert(self, t, dim: int):
        return self._along(t, dim, self.m.T)

    def matrix(self) -> np.ndarray:
        return self.m


@dataclass
class LightClientKey:
    """`p` (or `Q`), `pc` and, for classifiers, `pl`: the client key file's contents, in numpy."""

    bundle_id: str
    resid: Permutation | Mix
    vocab: Permutation
    labels: Permutation | None
    fingerprint: str

    @classmethod
    def load(cls, path: Path) -> "LightClientKey":
        meta, t = read_key_arrays(path, "client")
        resid = Mix(t["resid.mix"].astype(np.float64)) if "resid.mix" in t else _perm(t, "resid")
        labels = _perm(t, "labels") if "labels.perm" in t else None
        return cls(meta["bundle_id"], resid, _perm(t, "vocab"), labels, fingerprint("client", meta["bundle_id"], t))

    def residual_matrix(self) -> np.ndarray:
        """The [d, d] float64 matrix R with: rows the client sends = embedding rows @ R (plus any noise)."""
        return self.resid.matrix()

    @property
    def mixed(self) -> bool:
        return isinstance(self.resid, Mix)

    def check_belongs_to(self, bundle_id: str, what: str) -> None:
        if self.bundle_id != bundle_id:
            raise KeyMismatchError(
                f"the client key (bundle {self.bundle_id}) does not belong to {what} (bundle {bundle_id})")


def _perm(t: dict[str, np.ndarray], prefix: str) -> Permutation:
    sign = t.get(f"{prefix}.sign")
    return Permutation(t[f"{prefix}.perm"].astype(np.int64), None if sign is None else sign.astype(np.int8))
