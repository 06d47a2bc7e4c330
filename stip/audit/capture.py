"""Read a `stip serve --capture DIR` folder back as the attacker's observations (stip.server.capture writes it; a
TEE worker's capture, `stip serve --tee-worker --capture DIR`, has the same format: stip.server.tee_capture)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stip.audit.context import Observation
from stip.errors import StipError

INDEX_FILE = "index.jsonl"  # the same name stip.server.capture writes
OFFLOAD_PREFIX = "offload."  # a TEE worker's padded linear rows (stip.server.tee_capture)


def read_index(folder: str | Path) -> list[dict]:
    """The index lines in arrival order ({"seq", "file", "session", "kind", "start", "rows"})."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise StipError(f"{folder} is not a capture folder (no {INDEX_FILE}; see `stip serve --capture`)")
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            raise StipError(f"{path}: line {n} is not JSON") from None
    return sorted(entries, key=lambda e: int(e["seq"]))


def read_capture(folder: str | Path) -> list[Observation]:
    """Every captured step as an `Observation` (inputs [T, d], hidden {layer: [T, d]}, meta: session, kind, start,
    seq, and "source": "tee-worker" for a TEE worker's capture, whose inputs are `h1 p`), in the order the server
    received them. A TEE worker's padded linear rows are left out here: `read_offload` gives them."""
    from safetensors.torch import load_file

    out = []
    for entry in read_index(folder):
        tensors = load_file(str(Path(folder) / entry["file"]))
        hidden = {int(name.split(".", 1)[1]): t for name, t in tensors.items() if name.startswith("hidden.")}
        meta = {k: entry[k] for k in ("seq", "session", "kind", "start", "source") if k in entry}
        inputs = tensors["inputs"]
        if inputs.shape[0] != int(entry.get("rows", inputs.shape[0])):
            raise StipError(f"{folder}/{entry['file']}: {inputs.shape[0]} rows, but the index says {entry['rows']}")
        out.append(Observation(inputs, dict(sorted(hidden.items())), meta))
    return out


def read_offload(folder: str | Path) -> list[dict[str, torch.Tensor]]:
    """Per captured step, in `read_capture`'s order: the padded rows a TEE worker received for each offloaded linear
    ({linear name: [n, d_in] float64}; empty for a round-trip capture, which has none)."""
    from safetensors import safe_open

    out = []
    for entry in read_index(folder):
        names = list(entry.get("offload") or {})
        rows = {}
        if names:
            with safe_open(str(Path(folder) / entry["file"]), framework="pt") as f:
                rows = {name[len(OFFLOAD_PREFIX):]: f.get_tensor(name) for name in names}
        out.append(rows)
    return out
