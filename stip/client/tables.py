"""Memory-mapped matrices from the client bundle's safetensors files: the embedding table and the --head client LM
head are mapped, not read, so loading a bundle costs no memory and its resident size grows with the rows touched
(the pages are the file's own: shared between processes, dropped by the OS under pressure).

The table keeps the checkpoint's own dtype (float32, float16 or bfloat16): `stip protect` writes the client's tensors
as the model holds them, and rounding a float32 table to 16 bits would change the rows the server computes on.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np

from stip.common.arrays import bf16_to_float32
from stip.errors import BundleError

_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}  # bfloat16 is mapped as its bits (numpy has no bfloat16)


def map_matrix(path: Path, name: str = "weight", dtypes: tuple[str, ...] = tuple(_DTYPES)) -> tuple[np.memmap, str]:
    """(the [rows, cols] matrix `name` of a safetensors file, memory-mapped copy-on-write and never written; its
    safetensors dtype). The file's header (a little-endian u64 length, then JSON naming each tensor's dtype, shape
    and byte range after the header) says where it lies; safetensors' own loaders copy the data, which this avoids."""
    if sys.byteorder != "little":
        raise BundleError("client tables are mapped as little-endian; this machine is big-endian")
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        entry = header[name]
        rows, cols = (int(x) for x in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
        dtype = str(entry["dtype"])
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise BundleError(f"{path} is not a safetensors file holding a matrix {name!r}: {e}") from None
    if dtype not in dtypes or end - begin != rows * cols * np.dtype(_DTYPES[dtype]).itemsize:
        raise BundleError(f"{path}: {name!r} must be a [rows, cols] matrix in {', '.join(dtypes)}, got {dtype} "
                          f"{entry['shape']}")
    if path.stat().st_size < 8 + n + end:
        raise BundleError(f"{path} is shorter than its header says")
    if rows * cols == 0:
        return np.zeros((rows, cols), dtype=_DTYPES[dtype]), dtype
    return np.memmap(path, dtype=_DTYPES[dtype], mode="c", offset=8 + n + begin, shape=(rows, cols)), dtype


def rows_float32(table: np.ndarray, dtype: str, index) -> np.ndarray:
    """Rows (or a slice) of a mapped table as a fresh float32 array: only those rows' pages are read."""
    part = table[index]
    return bf16_to_float32(part) if dtype == "BF16" else part.astype(np.float32)


def mean_square(table: np.ndarray, dtype: str, rows_per_chunk: int = 4096) -> float:
    """The mean of the squared entries of a mapped table, in float64, chunk by chunk (--noise's scale)."""
    total = 0.0
    for a in range(0, table.shape[0], rows_per_chunk):
        part = rows_float32(table, dtype, slice(a, a + rows_per_chunk)).astype(np.float64)
        total += float((part * part).sum())
    return total / max(1, table.size)


def map_tensors(path: Path) -> dict[str, tuple[np.ndarray, str]]:
    """Every tensor of a safetensors file (a client module shard: an encoder's embeddings module), any shape, each
    memory-mapped as `map_matrix` maps one: name -> (array in its own dtype, its safetensors dtype)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        entries = {name: (str(e["dtype"]), [int(x) for x in e["shape"]], [int(x) for x in e["data_offsets"]])
                   for name, e in header.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as e:
        raise BundleError(f"{path} is not a safetensors file: {e}") from None
    size = path.stat().st_size
    out = {}
    for name, (dtype, shape, (begin, end)) in entries.items():
        if dtype not in _DTYPES or end - begin != int(np.prod(shape)) * np.dtype(_DTYPES[dtype]).itemsize \
                or size < 8 + n + end:
            raise BundleError(f"{path}: tensor {name!r} must be F32, F16 or BF16 and lie inside the file, got {dtype} "
                              f"{shape}")
        out[name] = (np.zeros(shape, dtype=_DTYPES[dtype]) if begin == end else
                     np.memmap(path, dtype=_DTYPES[dtype], mode="c", offset=8 + n + begin, shape=tuple(shape)), dtype)
    return out
