"""Reading and fingerprinting a key file, in numpy only (the light client loads its key with this; the torch side,
`stip.common.keys.file_format`, reads through it and writes the files).

A key file is safetensors with a format version, the key's kind, the bundle id and a fingerprint over the contents.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from stip.common.arrays import to_numpy
from stip.errors import BundleError

KEY_FORMAT = "stip-key"
KEY_VERSION = 1


def fingerprint(kind: str, bundle_id: str, tensors: dict) -> str:
    """sha256 over the format, kind, bundle id and every tensor (numpy or torch, by name), shown as 8 groups of 4 hex
    digits."""
    h = hashlib.sha256(f"{KEY_FORMAT}/{KEY_VERSION}/{kind}/{bundle_id}".encode())
    for name in sorted(tensors):
        h.update(name.encode() + b"\0" + np.ascontiguousarray(to_numpy(tensors[name])).tobytes())
    d = h.hexdigest()[:32]
    return ":".join(d[i : i + 4] for i in range(0, 32, 4))


def read_key_arrays(path: Path, kind: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Load and check a key file as numpy arrays: format, version, kind, and that its contents match its
    fingerprint."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"key file {path} is missing")
    try:
        with safe_open(str(path), "numpy") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as e:
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
