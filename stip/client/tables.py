"""The client bundle's matrices in safetensors files: the embedding table is read row by row with `os.pread`, the
--head client LM head (whose matmul reads every row) and encoders' module shards are memory-mapped. None is
loaded whole, so loading a bundle costs no memory.

The table is read, not mapped, because a mapping's resident size grows by more than the rows touched: loading a
bundle hashes every file (its signed sha256), which leaves the table in the page cache in large folios, and a fault
on a mapped page then maps the whole folio (a 7B-shaped table: file-backed RSS +253 MiB for 8 MiB of rows). A read
copies exactly the row's bytes and maps nothing; it costs the same per row (about 12 us against 11).

The table keeps the checkpoint's own dtype (float32, float16 or bfloat16): `stip protect` writes the client's tensors
as the model holds them, and rounding a float32 table to 16 bits would change the rows the server computes on.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import weakref
from pathlib import Path

import numpy as np

from stip.common.arrays import bf16_to_float32
from stip.errors import BundleError

_PREADV = hasattr(os, "preadv")  # reads into the array itself; os.pread (any Unix) copies its bytes
_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}  # bfloat16 is kept as its bits (numpy has no bfloat16)


def _matrix_entry(path: Path, name: str, dtypes: tuple[str, ...]) -> tuple[int, tuple[int, int], str]:
    """(the byte offset in the file, [rows, cols], safetensors dtype) of the matrix `name` of a safetensors file: its
    header (a little-endian u64 length, then JSON naming each tensor's dtype, shape and byte range after the header)
    says where it lies; safetensors' own loaders copy the data, which this avoids."""
    if sys.byteorder != "little":
        raise BundleError("client tables are read as little-endian; this machine is big-endian")
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
    return 8 + n + begin, (rows, cols), dtype


def map_matrix(path: Path, name: str = "weight", dtypes: tuple[str, ...] = tuple(_DTYPES)) -> tuple[np.memmap, str]:
    """(the [rows, cols] matrix `name` of a safetensors file, memory-mapped copy-on-write and never written; its
    safetensors dtype)."""
    offset, shape, dtype = _matrix_entry(path, name, dtypes)
    if shape[0] * shape[1] == 0:
        return np.zeros(shape, dtype=_DTYPES[dtype]), dtype
    return np.memmap(path, dtype=_DTYPES[dtype], mode="c", offset=offset, shape=shape), dtype


class RowFile:
    """A [rows, cols] matrix of a file, read on indexing with one `os.preadv`/`os.pread` per contiguous run of the
    rows asked for, into a fresh array (`table[ids]`, `table[a:b]`: what numpy indexing of the matrix would give). The file
    stays open, so a file renamed over it later is not read (as with a mapping)."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, int], dtype: str):
        self.path, self.offset, self.shape, self.dtype = Path(path), offset, shape, np.dtype(dtype)
        self.ndim, self.size = 2, shape[0] * shape[1]
        self.row_bytes = shape[1] * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, out: np.ndarray, row: int) -> None:
        """Fill `out` (C-contiguous, n whole rows) with rows row..row+n: straight into it with `os.preadv` where the
        OS has it, else through `os.pread`'s bytes."""
        view, at, done = memoryview(out).cast("B"), self.offset + row * self.row_bytes, 0
        while done < len(view):
            if _PREADV:
                got = os.preadv(self._fd, [view[done:]], at + done)
            else:
                data = os.pread(self._fd, len(view) - done, at + done)
                got = len(data)
                view[done:done + got] = data
            if not got:
                raise BundleError(f"{self.path} is shorter than its header says (it changed after loading)")
            done += got

    def __getitem__(self, index) -> np.ndarray:
        rows, cols = self.shape
        if isinstance(index, slice):
            a, b, step = index.indices(rows)
            if step == 1:
                out = np.empty((max(0, b - a), cols), self.dtype)
                if out.size:
                    self._read(out, a)
                return out
            index = np.arange(a, b, step)
        index = np.asarray(index)
        if index.dtype.kind not in "iu":
            raise IndexError(f"rows must be indexed by integers or a slice, got {index.dtype}")
        if index.size == 1:  # a decode step's one row: no sorting
            row = int(index.reshape(-1)[0])
            row += rows if row < 0 else 0
            if not 0 <= row < rows:
                raise IndexError(f"row index out of range [0, {rows})")
            out = np.empty(index.shape + (cols,), self.dtype)
            self._read(out, row)
            return out
        if not index.size:
            return np.empty(index.shape + (cols,), self.dtype)
        flat = index.reshape(-1).astype(np.int64)
        flat = np.where(flat < 0, flat + rows, flat)
        if int(flat.min()) < 0 or int(flat.max()) >= rows:
            raise IndexError(f"row index out of range [0, {rows})")
        wanted, where = np.unique(flat, return_inverse=True)
        out = np.empty((wanted.size, cols), self.dtype)
        cuts = np.flatnonzero(np.diff(wanted) != 1) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, wanted.size]):
            self._read(out[a:b], int(wanted[a]))
        return out[where.reshape(-1)].reshape(index.shape + (cols,))


def open_rows(path: Path, name: str = "weight", dtypes: tuple[str, ...] = tuple(_DTYPES)) -> tuple[np.ndarray, str]:
    """(the [rows, cols] matrix `name` of a safetensors file as a `RowFile`, read row by row; its safetensors
    dtype). Where the OS has no `os.pread` (Windows), the matrix is memory-mapped instead (`map_matrix`)."""
    if not hasattr(os, "pread"):
        return map_matrix(path, name, dtypes)
    offset, shape, dtype = _matrix_entry(path, name, dtypes)
    if shape[0] * shape[1] == 0:
        return np.zeros(shape, dtype=_DTYPES[dtype]), dtype
    return RowFile(path, offset, shape, _DTYPES[dtype]), dtype


def rows_float32(table: np.ndarray, dtype: str, index) -> np.ndarray:
    """Rows (or a slice) of a table (mapped, or a `RowFile`) as a fresh float32 array: only those rows are read."""
    part = table[index]
    return bf16_to_float32(part) if dtype == "BF16" else part.astype(np.float32)

def mean_square(table: np.ndarray, dtype: str, rows_per_chunk: int = 4096) -> float:
    """The mean of the squared entries of a table, in float64, chunk by chunk (--noise's scale)."""
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
