"""The enclave bundle's secrets at rest: tensors encrypted with ChaCha20-Poly1305 under a sealing key.

The sealing key is HKDF-SHA256 of the platform's sealing secret and the enclave's code measurement (as SGX's
MRENCLAVE sealing policy), so only this enclave code on this platform derives it; the worker and the host see
ciphertext. The file is a JSON header (format, bundle id, code measurement: the associated data of every chunk) and
the safetensors bytes in 64 MiB chunks, each with its index and a last-chunk flag in its associated data, so a
truncated, reordered or edited file is refused. Files are written atomically.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from safetensors.torch import load as st_load, save as st_save

from stip.common.files import write_bytes_atomic
from stip.errors import TeeError

MAGIC = b"STIP-SEALED-1\n"
FORMAT = "stip-sealed-v1"
CHUNK = 64 * 1024 * 1024
LEN = struct.Struct(">I")
CHUNK_AD = struct.Struct(">QB")  # chunk index, last-chunk flag


def sealing_key(sealing_secret: bytes, code_measurement: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"stip-enclave-seal-v1",
                info=code_measurement.encode()).derive(sealing_secret)


def seal_tensors(path: str | Path, tensors: dict[str, torch.Tensor], key: bytes, *, bundle_id: str,
                 code_measurement: str) -> None:
    """Encrypt `tensors` (as safetensors bytes) into `path`, owner-only."""
    data = st_save({k: v.contiguous() for k, v in tensors.items()})
    header = json.dumps({"format": FORMAT, "bundle_id": bundle_id, "code_measurement": code_measurement},
                        sort_keys=True).encode()
    prefix = os.urandom(4)
    aead = ChaCha20Poly1305(key)
    out = [MAGIC, LEN.pack(len(header)), header, prefix]
    n = max(1, -(-len(data) // CHUNK))
    for i in range(n):
        ct = aead.encrypt(prefix + struct.pack(">Q", i), data[i * CHUNK:(i + 1) * CHUNK],
                          header + CHUNK_AD.pack(i, i == n - 1))
        out += [LEN.pack(len(ct)), ct]
    write_bytes_atomic(Path(path), b"".join(out), mode=0o600)


def read_header(path: str | Path) -> dict:
    """The sealed file's clear header (format, bundle id, the code measurement it was sealed for)."""
    return _split(Path(path).read_bytes(), Path(path))[0]


def unseal_tensors(path: str | Path, key: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, tensors); `TeeError` if the key is not the one the file was sealed with or the file was altered."""
    path = Path(path)
    header, header_bytes, body = _split(path.read_bytes(), path)
    prefix, pos, i, parts, last = bytes(body[:4]), 4, 0, [], False
    aead = ChaCha20Poly1305(key)
    while pos < len(body):
        if last:
            raise TeeError(f"{path}: data after the last sealed chunk")
        (size,) = LEN.unpack_from(body, pos)
        ct = body[pos + 4:pos + 4 + size]
        pos += 4 + size
        last = pos >= len(body)
        try:
            parts.append(aead.decrypt(prefix + struct.pack(">Q", i), bytes(ct), header_bytes + CHUNK_AD.pack(i, last)))
        except InvalidTag:
            raise TeeError(f"{path}: cannot unseal: this enclave's code or platform is not the one the bundle was "
                           "sealed for, or the file was altered") from None
        i += 1
    if not parts:
        raise TeeError(f"{path}: the sealed file is truncated")
    return header, st_load(b"".join(parts))


def _split(raw: bytes, path: Path) -> tuple[dict, bytes, memoryview]:
    if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + 4:
        raise TeeError(f"{path} is not a sealed enclave file")
    pos = len(MAGIC)
    (n,) = LEN.unpack_from(raw, pos)
    header_bytes = raw[pos + 4:pos + 4 + n]
    try:
        header = json.loads(header_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TeeError(f"{path}: the sealed file's header is not JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise TeeError(f"{path}: not a {FORMAT} file")
    return header, header_bytes, memoryview(raw)[pos + 4 + n:]
