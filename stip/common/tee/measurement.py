"""The enclave's identity: its code measurement and its measurement.

Measurement: sha256 over the code the enclave runs (`ENCLAVE_CODE`, each file by path and content, sorted) and the
enclave bundle's signed manifest. A client pins it; a changed line of enclave code or a different bundle changes it.
The developer seals the enclave bundle under a key derived from the code measurement; the enclave derives the same.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from stip.common.bundles.manifest import MANIFEST_NAME
from stip.errors import TeeError

PACKAGE = Path(__file__).resolve().parents[2]  # the stip package
# The code the enclave runs: its own party folder and the shared modules it imports (paths relative to stip/).
ENCLAVE_CODE = ("enclave/*.py", "common/tee/*.py", "common/channel.py", "common/tee_protocol.py", "common/generate.py",
                "common/sampling.py", "common/wire.py", "common/ws.py", "common/files.py", "common/bundles/manifest.py",
                "common/signing.py", "common/layout.py", "common/transforms.py", "common/hosts.py", "errors.py")


def code_files(package: Path = PACKAGE) -> list[Path]:
    return sorted({p for pattern in ENCLAVE_CODE for p in package.glob(pattern) if p.is_file()})


def code_measurement(package: Path = PACKAGE) -> str:
    """sha256 over the enclave's code files, each as (path relative to the package, sha256 of its content)."""
    h = hashlib.sha256(b"stip-enclave-code-v1\n")
    for p in code_files(package):
        h.update(f"{p.relative_to(package).as_posix()} {hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def measurement(bundle: str | Path, package: Path = PACKAGE) -> str:
    """The enclave's measurement: its code and its bundle's manifest (which hashes every sealed file)."""
    manifest = Path(bundle) / MANIFEST_NAME
    if not manifest.is_file():
        raise TeeError(f"{bundle} is not an enclave bundle: {MANIFEST_NAME} is missing")
    h = hashlib.sha256(b"stip-enclave-measurement-v1\n")
    h.update(code_measurement(package).encode() + b"\n")
    h.update(hashlib.sha256(manifest.read_bytes()).hexdigest().encode())
    return h.hexdigest()
