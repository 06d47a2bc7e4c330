"""Block 0's KV cache in the enclave, preallocated: each session's keys and values live in a buffer that grows by
doubling (capped at the model's positions), and a step writes its rows in place.

transformers' `DynamicLayer` concatenates the whole cache onto the new rows at every step, so a decode token copies
all the cached keys and values (O(T) per token; for a 7B model's block 0 at 1,024 cached tokens, 16 MiB in float32 on
the enclave's critical path, docs/tee.md's cost model). `GrowingLayer` keeps the same interface (the attention gets
views `[B, H, :length, D]` of the buffer) with an amortised O(1) copy per token, like the round-trip server's batched
engine. Only full-attention layers are replaced; sliding-window layers keep transformers' own.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_CAPACITY = 64  # rows a session's buffer starts with (more if its prompt is longer)


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` over a preallocated buffer `[B, H, capacity, D]` that doubles when full."""

    def __init__(self, max_length: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.max_length = max_length or None
        self._k = self._v = None
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._k = self._v = None
        self.length = 0

    def _reserve(self, needed: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        cap = 0 if self._k is None else self._k.shape[-2]
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap, MIN_CAPACITY)
        if self.max_length:
            new_cap = max(needed, min(new_cap, self.max_length))
        k = key_states.new_empty((*key_states.shape[:-2], new_cap, key_states.shape[-1]))
        v = value_states.new_empty((*value_states.shape[:-2], new_cap, value_states.shape[-1]))
        if self.length:
            k[..., :self.length, :] = self._k[..., :self.length, :]
            v[..., :self.length, :] = self._v[..., :self.length, :]
        self._k, self._v = k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._reserve(end, key_states, value_states)
        self._k[..., self.length:end, :] = key_states
        self._v[..., self.length:end, :] = value_states
        self.length = end
        self.keys, self.values = self._k[..., :end, :], self._v[..., :end, :]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self._k = self._v = None
        self.length = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)  # slices keys/values; the buffer keeps its rows beyond, overwritten later
        self.length = 0 if self.keys is None else self.keys.shape[-2]

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the enclave's block-0 cache holds one sequence")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("the enclave's block-0 cache holds one sequence")


def new_cache(config, max_length: int | None = None) -> DynamicCache:
    """A `DynamicCache` for `config` whose full-attention layers are `GrowingLayer`s (at most `max_length` rows)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer(max_length) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
