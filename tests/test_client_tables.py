"""The client's embedding tables are read row by row (`stip.client.tables.RowFile`, os.pread), not memory-mapped:
the same values as the mapped matrix for every dtype and kind of index, and a loaded bundle maps no table file
(a mapping's resident size grew by whole page-cache folios, issue 22 item 2; bench.deploy_table measures it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from stip.client import tables
from stip.client.bundle import ClientBundle
from stip.client.tables import RowFile, map_matrix, mean_square, open_rows, rows_float32
from stip.common.layout import EMBEDDING_FILE
from stip.errors import BundleError

INDEXES = [np.array([5]), np.array(7), np.array([3, 3, 0, 256, 4, 5, 6, 100]), np.array([[1, 2], [2, 1]]),
           np.arange(10, 20), np.array([-1, 0]), np.array([], dtype=np.int64), [4, 2], np.array([9], np.uint8),
           slice(None), slice(3, 9), slice(250, 400), slice(0, 0), slice(1, 100, 7)]


@pytest.mark.parametrize("preadv", [True, False])  # False: os.pread's path (Unix without preadv)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rows_read_are_the_mapped_rows(tmp_path, monkeypatch, dtype, preadv):
    monkeypatch.setattr(tables, "_PREADV", preadv and tables._PREADV)
    weight = torch.randn(257, 33, generator=torch.Generator().manual_seed(0)).to(dtype)
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(5), "weight": weight, "z": torch.ones(2, 2)}, str(path))
    (mapped, kind), (read, kind2) = map_matrix(path), open_rows(path)
    assert isinstance(read, RowFile) and kind == kind2 and read.shape == (257, 33)
    for index in INDEXES:
        a, b = rows_float32(mapped, kind, index), rows_float32(read, kind2, index)
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape and a.tobytes() == b.tobytes(), index
    assert np.array_equal(rows_float32(read, kind, slice(None)), weight.float().numpy())
    assert mean_square(mapped, kind) == mean_square(read, kind2)
    for bad in (np.array([257]), np.array([-258]), np.array([0, 300])):
        with pytest.raises(IndexError):
            read[bad]
    with open(path, "r+b") as f:  # cut after loading: a clear error, not short rows
        f.truncate(path.stat().st_size - 33 * weight.element_size() * 2 - 100)
    with pytest.raises(BundleError, match="shorter"):
        read[np.array([256])]


def test_loaded_bundle_maps_no_table_and_embeds_as_the_mapped_tables(tiny_protected):
    _, out = tiny_protected("gpt2")  # learned positions: token and position tables
    bundle = ClientBundle.load(out / "client")
    ids = np.array([[1, 5, 5, 2], [7, 0, 3, 3]])
    got = bundle.embed(ids, start=2)
    with open("/proc/self/maps") as f:
        assert str((out / "client").resolve() / "embedding-") not in f.read()
    mapped = {name: map_matrix(out / "client" / EMBEDDING_FILE.format(name)) for name in ("token", "position")}
    same = ClientBundle(bundle.path, bundle.manifest, bundle.key, bundle.config, mapped)
    assert got.dtype == np.float32 and got.tobytes() == same.embed(ids, start=2).tobytes()
    assert bundle.token_embedding.tobytes() == same.token_embedding.tobytes()
