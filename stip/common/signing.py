"""Ed25519 signatures over bundle manifests: which developer made a bundle, checkable against a pinned key.

A sha256 manifest only catches accidents: whoever swaps a file can recompute the hashes. So `protect` signs every
manifest with the developer's Ed25519 key, and loaders check the signature always. What that proves depends on the
loader knowing the developer's public key beforehand ("pinned", `--trust ed25519:FP` or `STIP_TRUSTED_SIGNERS`):

- pinned: the bundle is exactly what that developer signed; a swapped file or a bundle re-signed by anyone else is
  refused.
- not pinned: the manifest is only self-consistent (it catches accidents and edits that were not re-signed); an
  attacker who re-signs the bundle with their own key is NOT detected. Loaders log a warning saying so.

The signature is a field of the manifest, over the canonical JSON of everything else in it (which includes the
signer's public key and the sha256 of every file): one file, written atomically, never out of step with itself.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from stip.common.files import write_bytes_atomic
from stip.errors import BundleError

ALGORITHM = "ed25519"
SIGNING_KEY_FILE = "signing.key"  # in the developer folder, beside developer.stipkey
TRUST_ENV = "STIP_TRUSTED_SIGNERS"
SIGNATURE_FIELD = "signature"
SIGNER_FIELD = "signer"
_PEM_HEADER = b"-----BEGIN PRIVATE KEY-----"

log = logging.getLogger("stip.signing")

Trusted = str | Iterable[str] | None  # "ed25519:FP", a bare fingerprint or a base64 public key; several allowed


# ---------------------------------------------------------------- keys


def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_raw(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(raw_public: bytes) -> str:
    """sha256 of the raw 32-byte public key, first 128 bits, grouped like the key-file fingerprints."""
    d = hashlib.sha256(raw_public).hexdigest()[:32]
    return ":".join(d[i : i + 4] for i in range(0, 32, 4))


def signer_info(key: Ed25519PrivateKey | Ed25519PublicKey) -> dict:
    raw = public_raw(key)
    return {"algorithm": ALGORITHM, "public_key": base64.b64encode(raw).decode(), "fingerprint": fingerprint(raw)}


def pin(info_or_fp: dict | str) -> str:
    """The `--trust` value for a signer: `ed25519:<fingerprint>`."""
    fp = info_or_fp["fingerprint"] if isinstance(info_or_fp, dict) else info_or_fp
    return f"{ALGORITHM}:{fp}"


def save_signing_key(key: Ed25519PrivateKey, path: Path) -> None:
    """PKCS#8 PEM, owner-only, written atomically."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_bytes_atomic(Path(path), pem, mode=0o600)


def is_signing_key_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(_PEM_HEADER)) == _PEM_HEADER


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"signing key {path} does not exist")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise BundleError(f"{path} is not an unencrypted PEM signing key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path} holds a {type(key).__name__}, STIP signs with Ed25519 keys only")
    if os.name == "posix" and path.stat().st_mode & 0o077:
        log.warning("signing key %s is readable by other users; chmod 600 it", path)
    return key


# ---------------------------------------------------------------- manifests


def canonical(manifest: dict) -> bytes:
    """The bytes that are signed: the manifest without its signature, as sorted compact JSON."""
    body = {k: v for k, v in manifest.items() if k != SIGNATURE_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_manifest(manifest: dict, key: Ed25519PrivateKey) -> dict:
    """A copy of `manifest` naming its signer and carrying the signature over everything else."""
    out = {k: v for k, v in manifest.items() if k != SIGNATURE_FIELD}
    out[SIGNER_FIELD] = signer_info(key)
    out[SIGNATURE_FIELD] = base64.b64encode(key.sign(canonical(out))).decode()
    return out


def _b64(value, what: str, where: str, size: int) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != size:
        raise BundleError(f"{where} has a malformed {what}")
    return raw


def check_manifest(manifest: dict, where: str, trusted: Trusted = None, warn_unpinned: bool = True) -> str:
    """Check the manifest's signature; return the signer's fingerprint.

    `trusted`: the pinned signer(s); None reads `STIP_TRUSTED_SIGNERS`. With a pin, any other signer is refused.
    Without one, a valid signature only shows self-consistency, and (if `warn_unpinned`) a warning says so.
    """
    signer, signature = manifest.get(SIGNER_FIELD), manifest.get(SIGNATURE_FIELD)
    if not isinstance(signer, dict) or signature is None:
        raise BundleError(f"{where} is not signed (no signer or signature): it was not written by `stip protect` "
                          f"of this version; protect the model again")
    if signer.get("algorithm") != ALGORITHM:
        raise BundleError(f"{where} is signed with {signer.get('algorithm')!r}; STIP accepts {ALGORITHM} only")
    raw = _b64(signer.get("public_key"), "signer public key", where, 32)
    sig = _b64(signature, "signature", where, 64)
    fp = fingerprint(raw)
    if signer.get("fingerprint") != fp:
        raise BundleError(f"{where} was modified: its signer fingerprint does not match the signer's public key")
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(sig, canonical(manifest))
    except InvalidSignature:
        raise BundleError(f"{where} was modified: its signature does not match its contents "
                          f"(claimed signer {pin(fp)})") from None
    check_pinned(fp, where, trusted, warn_unpinned)
    return fp


def check_pinned(fp: str, where: str, trusted: Trusted = None, warn_unpinned: bool = True) -> None:
    """Refuse a (validly signed) bundle whose signer `fp` is not pinned; without pins, warn what that means."""
    pins = trusted_fingerprints(trusted)
    if pins:
        if fp not in pins:
            raise BundleError(f"{where} is signed by {pin(fp)}, which is not a trusted signer "
                              f"(trusted: {', '.join(pin(p) for p in sorted(pins))}); this bundle was not made by "
                              f"the developer you pinned, or was re-signed by someone else")
    elif warn_unpinned:
        log.warning("%s is signed by %s, but no signer is pinned: the signature only shows the bundle is "
                    "self-consistent (it catches accidents and unsigned edits, NOT an attacker who re-signs it). "
                    "Check this fingerprint with the developer out of band, then pass --trust %s "
                    "(or set %s)", where, pin(fp), pin(fp), TRUST_ENV)


# ---------------------------------------------------------------- pins


_FP_HEX = re.compile(r"^[0-9a-f]{32}$")


def parse_trusted(spec: str) -> str:
    """One pin -> a fingerprint. Accepts `ed25519:FP`, a bare FP (colons optional), or a base64 public key."""
    value = spec.strip()
    if value.lower().startswith(ALGORITHM + ":"):
        value = value[len(ALGORITHM) + 1 :]
    hexed = value.replace(":", "").lower()
    if _FP_HEX.match(hexed):
        return ":".join(hexed[i : i + 4] for i in range(0, 32, 4))
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) == 32:
        return fingerprint(raw)
    raise BundleError(f"trusted signer {spec!r} is neither an {ALGORITHM} fingerprint (ed25519:xxxx:xxxx:... as "
                      f"`stip inspect` shows it) nor a base64 public key")


def trusted_fingerprints(trusted: Trusted = None) -> frozenset[str]:
    """The pinned fingerprints: from `trusted` (a string or several; commas or spaces separate), else the env."""
    if trusted is None:
        trusted = os.environ.get(TRUST_ENV, "")
    items = [trusted] if isinstance(trusted, str) else list(trusted)
    return frozenset(parse_trusted(p) for item in items for p in re.split(r"[,\s]+", item) if p.strip())
