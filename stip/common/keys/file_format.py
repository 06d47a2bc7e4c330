"""The key file format: safetensors with a format version, the key's kind, the bundle id and a fingerprint over the
contents, written atomically and owner-only; and how permutations are laid out as named tensors in it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from stip.common.files import write_bytes_atomic
from stip.common.transforms import SignedPermutation
from stip.errors import BundleError

KEY_FORMAT = "stip-key"
KEY_VERSION = 1


def fingerprint(kind: str, bundle_id: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the format, kind, bundle id and every tensor (by name), shown as 8 groups of 4 hex digits."""
    h = hashlib.sha256(f"{KEY_FORMAT}/{KEY_VERSION}/{kind}/{bundle_id}".encode())
    for name in sorted(tensors):
        h.update(name.encode() + b"\0" + tensors[name].contiguous().numpy().tobytes())
    d = h.hexdigest()[:32]
    return ":".join(d[i : i + 4] for i in range(0, 32, 4))


def write_key_file(path: Path, kind: str, bundle_id: str, tensors: dict[str, torch.Tensor], extra: dict) -> str:
    """Write a key file (owner-only, atomically) with its metadata; returns its fingerprint."""
    fp = fingerprint(kind, bundle_id, tensors)
    meta = {"format": KEY_FORMAT, "version": str(KEY_VERSION), "kind": kind, "bundle_id": bundle_id,
            "fingerprint": fp, **extra}
    write_bytes_atomic(Path(path), save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta), mode=0o600)
    return fp


def read_key_file(path: Path, kind: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Load and check a key file: format, version, kind, and that its contents match its fingerprint."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"key file {path} is missing")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{path} is not a STIP key file: {e}") from None
    if meta.get("format") != KEY_FORMAT:
        raise BundleError(f"{path} is not a STIP key file")
    if meta.get("version") != str(KEY_VERSION):
        raise BundleError(f"{path} has key format version {meta.get('version')}, this STIP reads {KEY_VERSION}")
    if meta.get("kind") != kind:
        raise BundleError(f"{path} is a {meta.get('kind')} key, expected a {kind} key")
    if fingerprint(kind, meta.get("bundle_id", ""), tensors) != meta.get("fingerprint"):
        raise BundleError(f"{path} is corrupt or was modified: its contents do not match its fingerprint")
    return meta, tensors


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
