"""`stip inspect` and `stip verify`: describe and check bundles and key files without loading any model."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from stip.common.files import read_manifest
from stip.common.keys import ClientKey, DeveloperKey, read_key_file
from stip.errors import BundleError, KeyMismatchError


def describe(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        m = read_manifest(path, verify=False)
        return {"bundle": str(path), "role": m["role"], "bundle_id": m["bundle_id"], "format": m["format"],
                "version": m["version"], "model_type": m.get("model_type"), "files": len(m["files"]),
                **{k: v for k, v in m.items() if k.endswith("fingerprint")}}
    if not path.is_file():
        raise BundleError(f"{path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            kind = (f.metadata() or {}).get("kind")
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a key file"
        raise BundleError(f"{path} is neither a bundle folder nor a STIP key file ({e})") from None
    if kind not in ("client", "developer"):
        raise BundleError(f"{path} is not a STIP key file")
    meta, _ = read_key_file(path, kind)  # checks the fingerprint
    return {"key": str(path), "kind": kind, "format": meta["format"], "version": int(meta["version"]),
            "bundle_id": meta["bundle_id"], "fingerprint": meta["fingerprint"]}


def verify_bundle(bundle: Path, key: Path | None = None) -> str:
    m = read_manifest(bundle, verify=True)
    lines = [f"ok: {m['role']} bundle {bundle} ({len(m['files'])} files verified, bundle {m['bundle_id']})"]
    if key is not None:
        info = describe(key)
        if "kind" not in info:
            raise BundleError(f"{key} is not a key file")
        loaded = ClientKey.load(key) if info["kind"] == "client" else DeveloperKey.load(key).client
        if loaded.bundle_id != m["bundle_id"]:
            raise KeyMismatchError(f"key {key} (bundle {loaded.bundle_id}) does not belong to {bundle} "
                                   f"(bundle {m['bundle_id']})")
        expected = m.get("client_key_fingerprint")
        if info["kind"] == "client" and expected and expected != info["fingerprint"]:
            raise KeyMismatchError(f"key {key} has fingerprint {info['fingerprint']}, the bundle expects {expected}")
        lines.append(f"ok: {info['kind']} key {key} ({info['fingerprint']}) belongs to this bundle")
    return "\n".join(lines)
