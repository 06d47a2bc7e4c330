"""Atomic, permission-aware file and directory writing, and file hashing.

Every artefact STIP writes goes through here, so an interrupted run never leaves a half-written key or bundle. The
signed bundle manifests built on these live in `stip.common.bundles.manifest`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from stip.errors import BundleError


def write_bytes_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write via a temporary file in the same folder, fsync, then rename: readers see the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, obj, mode: int = 0o644) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode)


def check_output(final: Path, overwrite: bool = False) -> None:
    """Refuse an output folder that exists and is not empty, unless `overwrite`."""
    final = Path(final).absolute()
    if final.exists() and not overwrite and (not final.is_dir() or any(final.iterdir())):
        raise BundleError(f"output {final} already exists and is not empty (pass --overwrite to replace it)")


@contextlib.contextmanager
def staged_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden sibling folder to fill; on success rename it to `final`, on any error delete it."""
    final = Path(final).absolute()
    check_output(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
    try:
        yield stage
        if final.exists():
            trash = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".old"))
            os.replace(final, trash / "old")
            os.replace(stage, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def sha256_file(path: Path) -> str:
    """The file's sha256, hex. `hashlib.file_digest` streams it through one small reused buffer: hashing a bundle's
    table at load leaves no large freed blocks in the client's heap (4 MiB chunks kept 3 MiB resident)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
