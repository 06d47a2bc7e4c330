"""Read a Hugging Face checkpoint one tensor at a time: safetensors or PyTorch .bin, sharded or not, or a GGUF file.

Safetensors shards are memory-mapped and read tensor by tensor; .bin shards are loaded with `mmap=True`, one shard at a
time. GGUF files hold quantized blocks that transformers dequantizes as a whole, so a GGUF model is loaded at once
(fine for the small models GGUF is used for here; big checkpoints come as safetensors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from transformers import AutoConfig

from stip.common.gguf_readers import shared_gguf_readers
from stip.developer.model_files import check_model_path, shard_files
from stip.errors import BundleError, TensorSetError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Read a safetensors file tensor by tensor with plain reads, in file order.

    `safe_open` memory-maps the file, and every page it touches stays in the process's resident set until the file
    is closed: on a multi-GB shard that is the whole shard. Reading into a fresh buffer keeps only one tensor.
    """
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{path} is not a safetensors file: {e}") from None
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            if info["dtype"] not in _ST_DTYPES:
                raise BundleError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            buf = bytearray(end - begin)
            f.seek(8 + header_len + begin)
            if f.readinto(buf) != len(buf):
                raise BundleError(f"{path} is truncated (tensor {name})")
            t = torch.frombuffer(buf, dtype=_ST_DTYPES[info["dtype"]]) if buf else \
                torch.empty(0, dtype=_ST_DTYPES[info["dtype"]])
            yield name, t.reshape(info["shape"])


@dataclass
class Checkpoint:
    """A model on disk: its config, where its tokenizer comes from, and a one-tensor-at-a-time reader."""

    path: Path
    config: object
    gguf_file: str | None = None
    _gguf_cache: dict | None = field(default=None, init=False, repr=False)  # see _gguf_state
    # the GGUF file parsed once for its config, weights and tokenizer (stip.common.gguf_readers); dropped after both
    _gguf_readers: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, model: str | Path) -> "Checkpoint":
        path = Path(model)
        check_model_path(path)
        if path.is_file():
            with shared_gguf_readers() as readers:
                config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            return cls(path.parent, config, path.name, _gguf_readers=readers)
        return cls(path, AutoConfig.from_pretrained(path))

    def _shards(self) -> list[Path]:
        return shard_files(self.path)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one by one; only the current tensor (or .bin shard) is resident."""
        if self.gguf_file:
            yield from self._gguf_tensors()
            return
        for shard in self._shards():
            if shard.suffix == ".safetensors":
                yield from read_safetensors(shard)
            else:
                state = torch.load(shard, map_location="cpu", mmap=True, weights_only=True)
                for name in list(state):
                    yield name, state.pop(name)
                del state

    def shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor `tensors()` yields, without reading the data: safetensors headers, .bin
        shards memory-mapped. A GGUF model is loaded (it is loaded whole anyway) and kept for `tensors()`."""
        if self.gguf_file:
            for name, t in self._gguf_state().items():
                yield name, tuple(t.shape)
            return
        for shard in self._shards():
            if shard.suffix == ".safetensors":
                with safe_open(str(shard), "pt") as f:
                    for name in f.keys():
                        yield name, tuple(f.get_slice(name).get_shape())
            else:
                state = torch.load(shard, map_location="cpu", mmap=True, weights_only=True)
                yield from ((name, tuple(t.shape)) for name, t in state.items())
                del state

    def read(self, names: set[str]) -> dict[str, torch.Tensor]:
        """The tensors named in `names` that the checkpoint holds, read by random access (a GGUF model is loaded and
        kept): for the few tensors a pass needs before streaming (the norms --harden mix folds)."""
        if self.gguf_file:
            return {n: t for n, t in self._gguf_state().items() if n in names}
        out: dict[str, torch.Tensor] = {}
        for shard in self._shards():
            if shard.suffix == ".safetensors":
                with safe_open(str(shard), "pt") as f:
                    out |= {n: f.get_tensor(n).clone() for n in f.keys() if n in names}
            else:
                state = torch.load(shard, map_location="cpu", mmap=True, weights_only=True)
                out |= {n: t.clone() for n, t in state.items() if n in names}
                del state
        return out

    def total_tensors(self) -> int | None:
        if self.gguf_file:
            return None
        n = 0
        for shard in self._shards():
            if shard.suffix != ".safetensors":
                return None
            with safe_open(str(shard), "pt") as f:
                n += len(list(f.keys()))
        return n

    def _gguf_state(self) -> dict[str, torch.Tensor]:
        """The dequantized GGUF model's tensors, loaded once; a tensor the GGUF file lacks is refused, not left at
        transformers' random initialisation."""
        if self._gguf_cache is None:
            from transformers import AutoModelForCausalLM

            # config: the one open() read (transformers copies it); the GGUF's reader: the one open() parsed
            with shared_gguf_readers(self._gguf_readers):
                model, info = AutoModelForCausalLM.from_pretrained(self.path, gguf_file=self.gguf_file,
                                                                   config=self.config, dtype=torch.float32,
                                                                   output_loading_info=True)
            if info["missing_keys"]:
                raise TensorSetError(f"{self.path / self.gguf_file} lacks tensor {sorted(info['missing_keys'])[0]!r}")
            self._gguf_cache = model.state_dict()  # a tied LM head is the embedding; protect skips it by its rule
            del model
        return self._gguf_cache

    def _gguf_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        state, self._gguf_cache = self._gguf_state(), None
        self._gguf_readers.clear()
        for name in list(state):
            yield name, state.pop(name)

    def load_tokenizer(self):
        """The model's tokenizer (with its chat template), or None for checkpoints that ship none."""
        from transformers import AutoTokenizer

        if self.gguf_file:
            with shared_gguf_readers(self._gguf_readers):
                tokenizer = AutoTokenizer.from_pretrained(self.path, gguf_file=self.gguf_file)
            if self._gguf_cache is not None:  # the weights are loaded too: the reader's work is done
                self._gguf_readers.clear()
            return tokenizer
        if not any((self.path / n).is_file() for n in _TOKENIZER_FILES):
            return None
        return AutoTokenizer.from_pretrained(self.path)

    def generation_config(self) -> dict | None:
        p = self.path / "generation_config.json"
        return json.loads(p.read_text()) if p.is_file() else None
