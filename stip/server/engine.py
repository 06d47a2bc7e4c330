"""The server's compute engine: a small interface the network layer drives, and its transformers implementation.

The network layer (`stip.server.service`) only ever calls the five methods of `Engine`, from as many threads as the
engine's `concurrent_steps` allows (1 for a plain engine: it needs no locking). Another backend can replace
`TransformersEngine` without touching the protocol: `stip.server.batching.BatchedEngine` runs many sessions' steps
in one forward through `step_batch`, and `stip.server.scheduler.Scheduler` wraps any engine so that concurrent
calls become such ticks (docs/batching.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache


class Engine(ABC):
    """Per-session state in, logits out. Embeddings arrive already in the protected basis; logits leave permuted."""

    hidden_size: int
    vocab_size: int
    model_type: str
    max_positions: int | None  # the model's own limit on sequence length, if it has one
    dtype: torch.dtype
    kv_bytes_per_token: int  # memory one cached token costs a session (the server's KV budget counts in these)

    @abstractmethod
    def new_state(self) -> Any:
        """Fresh per-session state (an empty KV cache)."""

    @abstractmethod
    def prefill(self, state: Any, embeds: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        """Append `embeds` [T, d] to the session; logits [T, V] (all_positions) or [1, V] (last), float32."""

    @abstractmethod
    def decode(self, state: Any, embed: torch.Tensor) -> torch.Tensor:
        """Append one embedding [1, d]; logits [1, V], float32."""

    @abstractmethod
    def length(self, state: Any) -> int:
        """Tokens held in the session's KV cache."""

    @abstractmethod
    def free(self, state: Any) -> None:
        """Release the session's KV cache (the state may not be used afterwards)."""

    # How many threads may call prefill/decode at once. 1: the server calls them from one worker thread. An engine
    # that merges concurrent calls into batched forwards (`stip.server.scheduler.Scheduler`) says more.
    concurrent_steps: int = 1

    def step_batch(self, steps: list["Step"]) -> list[torch.Tensor | None | BaseException]:
        """Run several sessions' steps (at most one per session) as one tick; per step: its logits (float32, [T, V]
        for "all", [1, V] for "last", None for "none") or the exception that failed that step alone.

        This default runs them one after another through `prefill`, so every engine works under the scheduler; a
        batched engine overrides it with one forward for all rows."""
        out: list = []
        for step in steps:
            try:
                logits = self.prefill(step.state, step.embeds, all_positions=step.logits == "all")
                out.append(None if step.logits == "none" else logits)
            except Exception as e:  # noqa: BLE001 - a failing row fails alone
                out.append(e)
        return out

    def close(self) -> None:
        """Stop any background work (the scheduler's tick thread); the serial engines have none."""

    name: str = "engine"  # what /health and /metrics call it, e.g. "transformers (serial)"
    _running = 0  # steps being computed now (an engine that runs one at a time: 0 or 1)
    _stepped = False  # whether any step has run (the default batch size: 0 before, 1 after)

    def stats(self) -> dict:
        """What /health and /metrics report: engine name, mode, rows in the last forward ("batch_size"), steps
        waiting for the engine ("queue"), steps being computed ("running"). Counts only, nothing per session. This
        default fits an engine that runs one step at a time; `Scheduler` reports its ticks."""
        return {"engine": self.name, "mode": "round-trip", "batch_size": 1 if self._stepped else 0, "queue": 0,
                "running": self._running}


@dataclass(eq=False)  # compared by identity: a step holds tensors
class Step:
    """One session's step in a tick: append `embeds` [T, d] to `state`; which logits come back: "last", "all"
    (every position) or "none" (a chunk in the middle of a long prefill)."""

    state: Any
    embeds: torch.Tensor
    logits: str = "last"


@dataclass
class TopK:
    """What an engine that cannot return all V logits gives back for a step (vLLM returns k log-probabilities):
    rows of the k largest, in the server's permuted vocabulary. `logsumexp` is each row's log-sum-exp over all V
    (0 where `values` are already log-probabilities). The server answers a top-k downlink with k <= `values.shape[1]`
    from it and refuses a full-logits downlink with a 400 naming the limit."""

    values: torch.Tensor  # float32 [n, k], descending
    indices: torch.Tensor  # int64 [n, k]
    logsumexp: torch.Tensor  # float32 [n]


class TokenEngine(ABC):
    """A server-decode engine: token ids in, token ids out, all in the permuted vocabulary (stip.common.generate).

    The server bundle is then a complete standard checkpoint (embedding and LM-head rows in `pc` order), so the
    engine samples and continues by itself: `stip.server.decoding` on our own batched engine, or vLLM."""

    vocab_size: int
    model_type: str
    max_positions: int | None
    kv_bytes_per_token: int
    manifest: dict

    @abstractmethod
    def generate(self, request, request_id: str, client: str = ""):
        """An async iterator of `stip.common.generate.GenerateChunk` for one `GenerateRequest`; the last chunk has a
        finish_reason. Closing the iterator early (the client went away) aborts the request and frees its KV.
        `client` is the API key's name (an engine with a shared prefix cache keeps clients apart by it)."""

    def close(self) -> None:
        """Stop background work."""

    name: str = "engine"

    def stats(self) -> dict:
        """As `Engine.stats`, for server-decode: "batch_size" counts sequences in the last step, "queue" requests
        waiting, "running" requests being generated. An engine that knows these overrides this default."""
        return {"engine": self.name, "mode": "server-decode", "batch_size": 0, "queue": 0, "running": 0}


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Keys and values of every layer: 2 x layers x kv_heads x head_dim x dtype size (a transformers config)."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * dtype.itemsize


@dataclass
class _CacheState:
    cache: Any = None
    length: int = 0
    freed: bool = field(default=False)


class TransformersEngine(Engine):
    """A stock transformers causal LM with one `DynamicCache` per session; steps run one at a time.

    Concurrent sessions are served serially (one forward per step, in arrival order): batching sessions of different
    lengths would need padding masks, which changes summation order and so would not be bit-identical to a solo run.
    """

    name = "transformers (serial)"

    def __init__(self, model, manifest: dict | None = None):
        self.model = model.eval()
        cfg = model.config
        self.config = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
        self.manifest = manifest or {}
        self.model_type = str(getattr(cfg, "model_type", "unknown"))
        self.hidden_size = int(self.config.hidden_size)
        out = getattr(model.get_output_embeddings(), "weight", None)  # none: --head client (an identity head)
        self.vocab_size = int(out.shape[0]) if out is not None else int(self.config.vocab_size)
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        maxpos = getattr(self.config, "max_position_embeddings", None) or getattr(self.config, "n_positions", None)
        self.max_positions = int(maxpos) if maxpos else None
        self.kv_bytes_per_token = kv_bytes_per_token(self.config, self.dtype)

    @classmethod
    def from_bundle(cls, bundle, dtype: torch.dtype = torch.float32, device: str = "cpu",
                    trusted=None) -> "TransformersEngine":
        from stip.server.model import load_protected_model

        model, manifest = load_protected_model(bundle, dtype=dtype, device=device, trusted=trusted)
        return cls(model, manifest)

    def new_state(self) -> _CacheState:
        return _CacheState()

    def length(self, state: _CacheState) -> int:
        return state.length

    def _forward(self, state: _CacheState, x: torch.Tensor, keep: int) -> torch.Tensor:
        if state.freed:
            raise RuntimeError("session state was freed")
        if state.cache is None:
            state.cache = DynamicCache(config=self.config)
        t = x.shape[0]
        pos = torch.arange(state.length, state.length + t, device=self.device).unsqueeze(0)
        self._running, self._stepped = 1, True
        try:
            with torch.inference_mode():
                out = self.model(inputs_embeds=x.to(device=self.device, dtype=self.dtype).unsqueeze(0),
                                 position_ids=pos, past_key_values=state.cache, use_cache=True, logits_to_keep=keep)
        finally:
            self._running = 0
        state.length += t
        return out.logits[0].float()

    def prefill(self, state: _CacheState, embeds: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        return self._forward(state, embeds, 0 if all_positions else 1)

    def decode(self, state: _CacheState, embed: torch.Tensor) -> torch.Tensor:
        return self._forward(state, embed.reshape(1, -1), 1)

    def free(self, state: _CacheState) -> None:
        state.cache = None
        state.length = 0
        state.freed = True
