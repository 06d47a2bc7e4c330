"""Round-trip bundles on vLLM (`stip serve --engine vllm`; see `stip.server.vllm_base` for what both modes share).

vLLM takes `prompt_embeds` but cannot take one new embedding per decode step, so `VllmRoundTripEngine` keeps each
session's embeddings and submits the whole sequence as a request for one token, asking for the top-k raw logits and
the row's log-sum-exp (`stip.server.vllm_logits`). vLLM's prefix cache (keyed on the embeddings and the session's
`cache_salt`) reuses the KV cache of all full blocks, and its scheduler batches every session's request.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stip.errors import StipError
from stip.server.engine import Engine, TopK
from stip.server.vllm_base import _VllmBase
from stip.server.vllm_bundle import _read_tensor, _weight_map
from stip.server.vllm_options import DEFAULT_TOP_K, _on_cpu, _whole


def round_trip_load_folder(bundle: Path, config, shapes: dict, signed_files) -> Path:
    """A folder vLLM can load a round-trip bundle from: links to the bundle's config and shards, plus one shard
    holding the input embedding as zeros, and an index naming it.

    A round-trip bundle has no input embedding (clients embed), but vLLM's model class loads one and refuses a
    checkpoint without it. Every request brings `prompt_embeds`, so the table is never read; zeros reveal nothing
    and are not the client's table. The caller removes the folder."""
    from safetensors.torch import save_file

    from stip.common.bundles.completeness import client_only, expected_tensors

    expected = expected_tensors(config)
    missing = sorted(client_only(config, expected) - set(shapes))
    weight_map = _weight_map(bundle)
    dtype = _read_tensor(bundle, next(iter(sorted(weight_map)))).dtype
    folder = Path(tempfile.mkdtemp(prefix="stip-vllm-load-"))
    try:
        for name in signed_files:  # the signed files only (read_manifest refused any other)
            if "/" not in name and name != "model.safetensors.index.json":
                os.symlink((bundle / name).resolve(), folder / name)
        zero_shard = "stip-zero-input-embedding.safetensors"
        if missing:
            save_file({name: torch.zeros(expected[name], dtype=dtype) for name in missing}, str(folder / zero_shard))
            weight_map.update({name: zero_shard for name in missing})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


@dataclass(eq=False)
class _Session:
    chunks: list = field(default_factory=list)  # the session's embeddings so far, as sent
    length: int = 0
    freed: bool = False
    salt: str = field(default_factory=lambda: secrets.token_hex(16))  # its client's (`bind_client`), else its own


class VllmRoundTripEngine(_VllmBase, Engine):
    """Round-trip on vLLM: each step re-submits the session's whole sequence of embeddings for one token.

    vLLM returns the top `max_top_k` raw logits of the last position (before any sampling setting, as our own engine
    sends them, so the client's repetition penalty sees what transformers' would) and the row's log-sum-exp
    (`stip.server.vllm_logits`), never all V logits: the server answers top-k downlinks with k <= max_top_k and
    refuses full-logits and all-positions requests. Prefix caching reuses full KV blocks only, so each step
    recomputes the last partial block (up to block_size - 1 tokens); blocks are shared only under one salt
    (`CacheSalts`)."""

    mode = "round-trip"
    concurrent_steps = 1024  # every session's step goes to vLLM at once; its scheduler batches them

    def __init__(self, bundle: Path, manifest: dict, config, shapes: dict, dtype: torch.dtype, options: dict):
        from stip.server.vllm_logits import FQCN

        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        # --vllm-arg max_logprobs=K: the top-k per step; vLLM returns one more entry, the row's log-sum-exp
        self.max_top_k = min(_whole(options.pop("max_logprobs", DEFAULT_TOP_K), "max_logprobs"),
                             int(text.vocab_size) - 1)
        self._folder = round_trip_load_folder(bundle, config, shapes, manifest["files"])
        try:
            defaults = {"enable_prompt_embeds": True, "enable_prefix_caching": True}
            if _on_cpu():
                defaults["block_size"] = 32  # CPU attention needs a multiple of 32
            needed = {"logprobs_mode": "processed_logits", "logits_processors": [FQCN],
                      "max_logprobs": self.max_top_k + 1}
            self._start(bundle, manifest, config, self._folder, dtype, options, defaults, needed)
        except BaseException:
            shutil.rmtree(self._folder, ignore_errors=True)
            raise
        # The server also holds each session's embeddings (re-sent to vLLM every step): count them in the budget.
        self.kv_bytes_per_token += self.hidden_size * dtype.itemsize

    def new_state(self) -> _Session:
        return _Session()

    def bind_client(self, state: _Session, client: str) -> None:
        """The session belongs to `client` (an API key's name): its prefix-cache salt becomes the key's."""
        state.salt = self.salts.for_client(client)

    def length(self, state: _Session) -> int:
        return state.length

    def free(self, state: _Session) -> None:
        state.chunks, state.length, state.freed = [], 0, True

    async def _one(self, sequence: torch.Tensor, salt: str, request_id: str):
        """-> (vLLM's {id: Logprob} for the last position, the carrier's id: the sampled token)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=self.max_top_k + 1, detokenize=False)
        final = None
        async for out in self._vllm.llm.generate({"prompt_embeds": sequence, "cache_salt": salt}, params,
                                                 request_id):
            final = out
        self._cached(final)
        return final.outputs[0].logprobs[-1], int(final.outputs[0].token_ids[-1])

    def _submit(self, state: _Session, embeds: torch.Tensor, all_positions: bool):
        if state.freed:
            raise RuntimeError("session state was freed")
        if all_positions:
            raise StipError("the vllm engine returns the last position only (positions='all' is refused)")
        if embeds.ndim != 2 or embeds.shape[1] != self.hidden_size:
            raise ValueError(f"a step takes embeddings [T, {self.hidden_size}], got {list(embeds.shape)}")
        if state.length + embeds.shape[0] > self.max_positions:
            raise ValueError(f"sequence of {state.length + embeds.shape[0]} tokens exceeds vLLM's max_model_len "
                             f"{self.max_positions}")
        new = embeds.detach().to(dtype=self.dtype, device="cpu").contiguous()
        sequence = torch.cat(state.chunks + [new]) if state.chunks else new
        self._count(1)
        return new, self._vllm.submit(self._one(sequence, state.salt, os.urandom(8).hex()))

    def _finish(self, state: _Session, new: torch.Tensor, future) -> TopK:
        try:
            d, carrier = future.result()
        finally:
            self._count(-1)
        # the carrier (stip.server.vllm_logits) holds the log-sum-exp; the others are the top raw logits
        top = sorted((lp.rank, i, lp.logprob) for i, lp in d.items()
                     if lp.rank is not None and i != carrier)[:self.max_top_k]
        if state.freed:
            raise RuntimeError("session state was freed")
        state.chunks.append(new)
        state.length += new.shape[0]
        return TopK(values=torch.tensor([[v for _, _, v in top]], dtype=torch.float32),
                    indices=torch.tensor([[i for _, i, _ in top]], dtype=torch.int64),
                    logsumexp=torch.tensor([d[carrier].logprob], dtype=torch.float32))

    def prefill(self, state: _Session, embeds: torch.Tensor, all_positions: bool = False) -> TopK:
        new, future = self._submit(state, embeds, all_positions)
        return self._finish(state, new, future)

    def decode(self, state: _Session, embed: torch.Tensor) -> TopK:
        return self.prefill(state, embed.reshape(1, -1))

    def step_batch(self, steps) -> list:
        """All steps go to vLLM at once (its scheduler batches them); each fails alone."""
        pending: list = []
        for step in steps:
            try:
                pending.append(self._submit(step.state, step.embeds, step.logits == "all"))
            except Exception as e:  # noqa: BLE001
                pending.append(e)
        out: list = []
        for step, p in zip(steps, pending):
            if isinstance(p, BaseException):
                out.append(p)
                continue
            try:
                result = self._finish(step.state, *p)
                out.append(None if step.logits == "none" else result)
            except Exception as e:  # noqa: BLE001
                out.append(e)
        return out

    def close(self) -> None:
        try:
            super().close()
        finally:
            shutil.rmtree(self._folder, ignore_errors=True)
