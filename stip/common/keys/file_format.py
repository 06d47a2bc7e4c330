"""The key file format: safetensors with a format version, the key's kind, the bundle id and a fingerprint over the
contents, written atomically and owner-only; and how permutations are laid out as named tensors in it."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save

from stip.common import key_file
from stip.common.files import write_bytes_atomic
from stip.common.transforms import SignedPermutation

KEY_FORMAT, KEY_VERSION = key_file.KEY_FORMAT, key_file.KEY_VERSION
fingerprint = key_file.fingerprint  # one implementation: the light client's (numpy)


def write_key_file(path: Path, kind: str, bundle_id: str, tensors: dict[str, torch.Tensor], extra: dict) -> str:
    """Write a key file (owner-only, atomically) with its metadata; returns its fingerprint."""
    fp = fingerprint(kind, bundle_id, tensors)
    meta = {"format": KEY_FORMAT, "version": str(KEY_VERSION), "kind": kind, "bundle_id": bundle_id,
            "fingerprint": fp, **extra}
    write_bytes_atomic(Path(path), save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta), mode=0o600)
    return fp


def read_key_file(path: Path, kind: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Load and check a key file: format, version, kind, and that its contents match its fingerprint
    (`stip.common.key_file`)."""
    meta, arrays = key_file.read_key_arrays(path, kind)
    return meta, {name: torch.from_numpy(a) for name, a in arrays.items()}


def perm_tensors(prefix: str, t: SignedPermutation) -> dict[str, torch.Tensor]:
    """`prefix.perm`, and `prefix.sign` (int8) where the permutation flips signs."""
    out = {f"{prefix}.perm": t.perm}
    if t.sign is not None:
        out[f"{prefix}.sign"] = t.sign.to(torch.int8)
    return out


def perm_from(tensors: dict[str, torch.Tensor], prefix: str) -> SignedPermutation:
    return SignedPermutation(tensors[f"{prefix}.perm"].to(torch.int64), tensors.get(f"{prefix}.sign"))


def stack_perms(prefix: str, perms: list[SignedPermutation]) -> dict[str, torch.Tensor]:
    """Equal-length permutations as one [n, len] `prefix.perm` (and `prefix.sign` if any flips signs)."""
    out = {f"{prefix}.perm": torch.stack([p.perm for p in perms])}
    if any(p.sign is not None for p in perms):
        out[f"{prefix}.sign"] = torch.stack(
            [torch.ones(len(p), dtype=torch.int8) if p.sign is None else p.sign.to(torch.int8) for p in perms])
    return out


def unstack_perms(t: dict[str, torch.Tensor], prefix: str) -> list[SignedPermutation]:
    perms, signs = t[f"{prefix}.perm"].long(), t.get(f"{prefix}.sign")
    return [SignedPermutation(perms[k], None if signs is None else signs[k]) for k in range(perms.shape[0])]
