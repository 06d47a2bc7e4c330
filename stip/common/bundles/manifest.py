"""Bundle manifests: the sha256 of every file of a bundle folder, signed by the developer; the one contract every
party's loader reads a bundle by.

Files are written atomically (`stip.common.files`) and manifests signed and checked by `stip.common.signing`: loaders
check the signature, then every file's sha256, and read only the files the manifest lists.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from stip.common import signing
from stip.common.files import sha256_file, write_json_atomic
from stip.errors import BundleError

MANIFEST_NAME = "stip-manifest.json"
MANIFEST_FORMAT = "stip-bundle"
MANIFEST_VERSION = 2  # 2: signed (signer + signature fields)


def write_manifest(bundle: Path, role: str, bundle_id: str, extra: dict | None = None, *,
                   signing_key: signing.Ed25519PrivateKey) -> dict:
    """Hash every file of the bundle folder into its manifest and sign it. Call last, once the folder is complete."""
    bundle = Path(bundle)
    files = {
        p.relative_to(bundle).as_posix(): sha256_file(p)
        for p in sorted(bundle.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "role": role,
        "bundle_id": bundle_id,
        "files": files,
        **(extra or {}),
    }
    manifest = signing.sign_manifest(manifest, signing_key)
    write_json_atomic(bundle / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(bundle: Path, role: str | None = None, verify: bool = True, trusted: signing.Trusted = None,
                  warn_unpinned: bool = True) -> dict:
    """Load a bundle's manifest and check it: format, signature (against `trusted`, see `signing.check_manifest`),
    role, and (if `verify`) that the folder holds exactly the listed files, each with its sha256."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"{bundle} is not a folder")
    path = bundle / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle} is not a STIP bundle: {MANIFEST_NAME} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise BundleError(f"{path} is not a STIP manifest")
    if manifest.get("version") == 1:
        raise BundleError(f"{path} is an unsigned manifest (version 1) from an older STIP; protect the model again")
    if manifest.get("version") != MANIFEST_VERSION:
        raise BundleError(f"{path} has manifest version {manifest.get('version')}, this STIP reads {MANIFEST_VERSION}")
    signing.check_manifest(manifest, str(path), trusted, warn_unpinned)
    if role is not None and manifest.get("role") != role:
        raise BundleError(f"{bundle} is a {manifest.get('role')!r} bundle, expected a {role!r} bundle")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path} lists no files")
    if verify:
        check_no_unlisted(bundle, files)
        root = bundle.resolve()
        for name, digest in files.items():
            target = (bundle / name).resolve()
            if root not in target.parents:
                raise BundleError(f"{path} names a file outside the bundle: {name!r}")
            if not target.is_file():
                raise BundleError(f"{bundle} is incomplete: {name} is missing")
            if sha256_file(target) != digest:
                raise BundleError(f"{bundle} was modified: sha256 of {name} does not match the manifest")
    return manifest


def unlisted_paths(bundle: Path, listed) -> list[str]:
    """Every path under `bundle` that is neither a listed file nor a folder on the way to one, the top-level
    manifest aside: hidden files, temp files, `__pycache__`, symlinks and empty folders included (a folder is named
    with a trailing "/" and not entered). Nothing is exempt: loaders such as transformers pick files by name."""
    listed = set(listed)
    folders = {name.rsplit("/", i)[0] for name in listed for i in range(1, name.count("/") + 1)}
    found: list[str] = []

    def walk(folder: str, prefix: str) -> None:
        with os.scandir(folder) as entries:
            for entry in entries:
                rel = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    if rel in folders:
                        walk(entry.path, rel + "/")
                    else:
                        found.append(rel + "/")
                elif rel not in listed and rel != MANIFEST_NAME:
                    found.append(rel)

    walk(str(bundle), "")
    return sorted(found)


def check_no_unlisted(bundle: Path, listed) -> None:
    """Refuse a bundle folder holding anything its signed manifest does not list, naming it."""
    extra = unlisted_paths(bundle, listed)
    if extra:
        shown = ", ".join(extra[:8]) + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
        raise BundleError(f"{bundle} holds files its signed manifest does not list: {shown}. A bundle loads exactly "
                          f"its signed files: remove these (or protect the model again)")


def listed_files(manifest: dict, prefix: str = "", suffix: str = "") -> list[str]:
    """The manifest's file names that start with `prefix` and end with `suffix`, sorted: what a loader may read."""
    return sorted(n for n in manifest["files"] if n.startswith(prefix) and n.endswith(suffix))


@contextlib.contextmanager
def listed_view(bundle: Path, names) -> Iterator[Path]:
    """A temporary folder of symlinks to `names` (files listed in the bundle's manifest) and nothing else: for
    loaders that choose files by what a folder holds (transformers' `from_pretrained`), so they see only signed
    files. Removed on exit; what was loaded from it stays loaded."""
    bundle = Path(bundle).absolute()
    view = Path(tempfile.mkdtemp(prefix="stip-bundle-view-"))
    try:
        for name in names:
            link = view / name
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(bundle / name, link)
        yield view
    finally:
        shutil.rmtree(view, ignore_errors=True)


def resign(bundle: str | Path, key: signing.Ed25519PrivateKey | str | Path) -> dict:
    """Recompute a bundle's file hashes and sign its manifest with `key`: what an attacker who swapped files would
    do. For tests (and for a developer moving a bundle to a new key); loaders that pin the old signer refuse it."""
    bundle = Path(bundle)
    key = key if isinstance(key, signing.Ed25519PrivateKey) else signing.load_signing_key(key)
    old = json.loads((bundle / MANIFEST_NAME).read_text())
    signed = ("format", "version", "role", "bundle_id", "files", signing.SIGNER_FIELD, signing.SIGNATURE_FIELD)
    keep = {k: v for k, v in old.items() if k not in signed}
    return write_manifest(bundle, old["role"], old["bundle_id"], keep, signing_key=key)
