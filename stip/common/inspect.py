"""`stip inspect` and `stip verify`: describe and check bundles, key files and signing keys without loading a model.
Key files are read with torch, imported only for them: a bundle or a signing key is checked without it (seconds)."""

from __future__ import annotations

from pathlib import Path

from stip.common import signing
from stip.common.bundles.manifest import read_manifest
from stip.errors import BundleError, KeyMismatchError


def describe(path: Path) -> dict:
    """A bundle (its signer too, for checking out of band), a key file, or the developer's signing key."""
    path = Path(path)
    if path.is_dir():
        m = read_manifest(path, verify=False, trusted=[], warn_unpinned=False)  # the signature; no pin: it shows it
        return {"bundle": str(path), "role": m["role"], "bundle_id": m["bundle_id"], "format": m["format"],
                "version": m["version"], "model_type": m.get("model_type"), "files": len(m["files"]),
                **{k: v for k, v in m.items() if k.endswith("fingerprint")}, **_signer(m["signer"])}
    if not path.is_file():
        raise BundleError(f"{path} does not exist")
    if signing.is_signing_key_file(path):
        return {"signing_key": str(path), **_signer(signing.signer_info(signing.load_signing_key(path)))}
    from safetensors import safe_open

    from stip.common.keys import read_key_file

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


def _signer(info: dict) -> dict:
    return {"signer": signing.pin(info), "signer_public_key": info["public_key"],
            "trust": f"--trust {signing.pin(info)}"}


def verify_bundle(bundle: Path, key: Path | None = None, trusted: signing.Trusted = None) -> str:
    m = read_manifest(bundle, verify=True, trusted=trusted)
    pinned = "pinned" if signing.trusted_fingerprints(trusted) else "NOT pinned: self-consistent only"
    lines = [f"ok: {m['role']} bundle {bundle} ({len(m['files'])} files verified, bundle {m['bundle_id']}, "
             f"signed by {signing.pin(m['signer'])}, {pinned})"]
    if key is not None:
        info = describe(key)
        if "kind" not in info:
            raise BundleError(f"{key} is not a key file")
        from stip.common.keys import ClientKey, DeveloperKey

        loaded = ClientKey.load(key) if info["kind"] == "client" else DeveloperKey.load(key).client
        if loaded.bundle_id != m["bundle_id"]:
            raise KeyMismatchError(f"key {key} (bundle {loaded.bundle_id}) does not belong to {bundle} "
                                   f"(bundle {m['bundle_id']})")
        expected = m.get(f"{info['kind']}_key_fingerprint")
        if expected and expected != info["fingerprint"]:
            raise KeyMismatchError(f"key {key} has fingerprint {info['fingerprint']}, the bundle expects {expected}")
        lines.append(f"ok: {info['kind']} key {key} ({info['fingerprint']}) belongs to this bundle")
    return "\n".join(lines)
