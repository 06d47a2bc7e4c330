"""Qwen3: LLaMA's blocks plus an RMSNorm over the head dims of Q and of K (`q_norm`, `k_norm`), one weight shared
by all heads, applied before RoPE.

A signed permutation of a head's dims commutes with RMSNorm if the norm's weight is permuted the same way (signs pass
through: they multiply the normalized value and the weight's product alike). One weight serves every head, so every
head's in-head Q/K transform must move dims identically: the key (`Geometry.qk_norm`) draws one RoPE swap pattern per
layer and lets each KV head vary only its signs; the norm weights get that shared move ("attn_qk_head")."""

from functools import partial

from stip.common.architectures.llama import (ATTENTION_RULES, LAYER, MLP_RULES, NORM_RULES, TAIL_RULES,
                                             TOKEN_EMBEDDING_RULE)
from stip.common.architectures.rules import Architecture, TensorRule, attention_geometry, vec

QK_NORM_RULES = (TensorRule(LAYER + r"self_attn\.[qk]_norm\.weight", vec("attn_qk_head")),)

QWEN3 = Architecture(
    model_types=("qwen3",),
    base_prefix="model.",
    rules=(TOKEN_EMBEDDING_RULE, *ATTENTION_RULES, *QK_NORM_RULES, *MLP_RULES, *NORM_RULES, *TAIL_RULES),
    geometry=partial(attention_geometry, qk_norm=True),
)
