"""The client key: the residual-stream and vocabulary (and, for classifiers, label) transforms a data owner receives,
and its key file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from stip.common.keys.file_format import fingerprint, perm_from, perm_tensors, read_key_file, write_key_file
from stip.common.transforms import Dense, SignedPermutation
from stip.errors import KeyMismatchError


@dataclass
class ClientKey:
    """`p` (residual stream), `pc` (vocabulary) and, for classifiers, `pl` (labels): what the data owner needs to
    talk to the protected model. A classifier's outputs are permuted by `pl` as an LM head's are by `pc`."""

    bundle_id: str
    resid: SignedPermutation | Dense  # `p`, or with --harden mix a dense orthogonal `Q`
    vocab: SignedPermutation
    labels: SignedPermutation | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {**_resid_tensors(self.resid), **perm_tensors("vocab", self.vocab)}
        if self.labels is not None:
            out |= perm_tensors("labels", self.labels)
        return out

    @property
    def fingerprint(self) -> str:
        return fingerprint("client", self.bundle_id, self.tensors())

    def save(self, path: Path) -> str:
        return write_key_file(path, "client", self.bundle_id, self.tensors(), {})

    @classmethod
    def load(cls, path: Path) -> "ClientKey":
        meta, t = read_key_file(path, "client")
        return cls.from_tensors(meta["bundle_id"], t)

    @classmethod
    def from_tensors(cls, bundle_id: str, t: dict[str, torch.Tensor]) -> "ClientKey":
        """The client part of a key file's tensors (a developer key file holds it too)."""
        return cls(bundle_id, _resid_from(t), perm_from(t, "vocab"), _labels_from(t))

    def residual_matrix(self) -> torch.Tensor:
        """The [d, d] float64 matrix R with: rows the client sends = embedding rows @ R (plus noise where the bundle
        adds it). The signed permutation matrix of `p`, or `Q` under --harden mix."""
        return self.resid.matrix()

    @property
    def mixed(self) -> bool:
        """Whether the residual stream is densely mixed (--harden mix) rather than permuted."""
        return isinstance(self.resid, Dense)

    def check_belongs_to(self, bundle_id: str, what: str) -> None:
        if self.bundle_id != bundle_id:
            raise KeyMismatchError(
                f"the client key (bundle {self.bundle_id}) does not belong to {what} (bundle {bundle_id})")


def _labels_from(t: dict[str, torch.Tensor]) -> SignedPermutation | None:
    return perm_from(t, "labels") if "labels.perm" in t else None


def _resid_tensors(resid: SignedPermutation | Dense) -> dict[str, torch.Tensor]:
    return {"resid.mix": resid.m.double()} if isinstance(resid, Dense) else perm_tensors("resid", resid)


def _resid_from(t: dict[str, torch.Tensor]) -> SignedPermutation | Dense:
    return Dense(t["resid.mix"].double()) if "resid.mix" in t else perm_from(t, "resid")
