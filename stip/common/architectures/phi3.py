"""Phi-3: a LLaMA-style decoder whose Q, K and V projections are one fused `qkv_proj` (outputs [q | k | v], GQA
sizes) and whose gate and up projections are one fused `gate_up_proj` (outputs [gate | up]).

The fused outputs get the concatenation of their parts' transforms: "attn_qkv" (each part its own head order and
in-head transform, RoPE quarter-turns on Q and K) and "ffn_gate_up" (the layer's FFN permutation on both halves, so
gate and up neurons stay paired). A partial rotary factor other than 1 is refused (the quarter-turns assume RoPE on
every head dim)."""

from stip.common.architectures.llama import LAYER as L
from stip.common.architectures.llama import NORM_RULES, TAIL_RULES, TOKEN_EMBEDDING_RULE
from stip.common.architectures.rules import Architecture, TensorRule, attention_geometry, linear

PHI3 = Architecture(
    model_types=("phi3",),
    base_prefix="model.",
    rules=(
        TOKEN_EMBEDDING_RULE,
        TensorRule(L + r"self_attn\.qkv_proj\.weight", linear("attn_qkv", "resid")),
        TensorRule(L + r"self_attn\.o_proj\.weight", linear("resid", "attn_o")),
        TensorRule(L + r"mlp\.gate_up_proj\.weight", linear("ffn_gate_up", "resid")),
        TensorRule(L + r"mlp\.down_proj\.weight", linear("resid", "ffn")),
        *NORM_RULES,
        *TAIL_RULES,
    ),
    geometry=attention_geometry,
)
