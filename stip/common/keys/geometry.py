"""The shapes a protection key is drawn for: every key part's size comes from here, and a key is checked against it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Geometry:
    """The shapes a key must match; read from the model config."""

    hidden: int
    vocab: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    rope: bool
    labels: int = 0  # classifier outputs (sequence or image classification): the client key's label permutation
    experts: int = 0  # MoE experts per layer: each layer's expert order and one FFN permutation per expert
    expert_ffn: int = 0  # the experts' FFN width where it differs from `ffn` (Qwen-MoE's moe_intermediate_size; `ffn`
    # is then its dense layers' or shared expert's width)
    qk_norm: bool = False  # Q/K normed over head dims by one weight for all heads (Qwen3, Gemma): every head's
    # in-head Q/K transform then moves dims the same way (signs may differ), and that weight is moved with it

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA); 1 for plain multi-head attention."""
        return self.heads // self.kv_heads
