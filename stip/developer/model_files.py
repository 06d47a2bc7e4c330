"""The model argument's files, checked without torch or transformers: `stip protect` refuses a missing model, a
folder without config.json or weights, or an incomplete sharded checkpoint at once, before its slow imports;
`Checkpoint.open` runs the same checks and reads the weights through `shard_files`."""

from __future__ import annotations

import json
from pathlib import Path

from stip.errors import BundleError


def shard_files(path: Path) -> list[Path]:
    """The weight files of a Hugging Face model folder (an index's shards, all present, or the single file)."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = path / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [n for n in names if not (path / n).is_file()]
            if missing:
                raise BundleError(f"{path} is incomplete: shard {missing[0]} named by {index_name} is missing")
            return [path / n for n in names]
        if (path / single).is_file():
            return [path / single]
    return []


def check_model_path(path: Path) -> None:
    """A .gguf file, or a model folder with its config.json and every weight file; otherwise a BundleError."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"model {path} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise BundleError(f"{path} is a file but not a .gguf file; pass a Hugging Face model folder or GGUF")
        return
    if not (path / "config.json").is_file():
        raise BundleError(f"{path} is not a Hugging Face model folder: config.json is missing")
    if not shard_files(path):
        raise BundleError(f"{path} holds no weights (no *.safetensors or pytorch_model*.bin files)")
