"""The streaming shard writer: protected tensors go to disk as they come, in standard safetensors shards.

`stip protect` holds at most one shard's worth of tensors in memory; the shards are named `shard-NNNNN.tmp` until the
last one is written, when their final `model-XXXXX-of-YYYYY.safetensors` names (which need the count) are known.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from stip.common.files import write_json_atomic

DEFAULT_SHARD_BYTES = 512 * 1024**2


class ShardWriter:
    """Buffers tensors and writes standard `model-XXXXX-of-YYYYY.safetensors` shards plus their index."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder, self.max_bytes = folder, max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffered + size > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor
        self.buffered += size
        self.total += size

    def flush(self) -> None:
        if not self.buffer:
            return
        save_file(self.buffer, str(self.folder / f"shard-{len(self.shards):05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.buffer))
        self.buffer, self.buffered = {}, 0

    def close(self) -> None:
        self.flush()
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f"shard-{i:05d}.tmp").rename(self.folder / final)
            weight_map |= {name: final for name in names}
        write_json_atomic(self.folder / "model.safetensors.index.json",
                          {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))})
