"""StarCoder2: LLaMA-style attention (RoPE, GQA, biases on every projection) with LayerNorm (weight and bias) instead
of RMSNorm, a plain GELU MLP (`c_fc`, `c_proj`) instead of SwiGLU, and sliding-window attention.

Nothing here needs code: LayerNorm's bias lives in the residual space like its weight, the MLP is an FFN permutation
between two linears, and the window acts on positions, which no transform touches."""

from stip.common.architectures.llama import ATTENTION_RULES, LAYER as L, TAIL_RULES, TOKEN_EMBEDDING_RULE
from stip.common.architectures.rules import Architecture, TensorRule, attention_geometry, linear, vec

STARCODER2 = Architecture(
    model_types=("starcoder2",),
    base_prefix="model.",
    rules=(
        TOKEN_EMBEDDING_RULE,
        *ATTENTION_RULES,
        TensorRule(L + r"mlp\.c_fc\.weight", linear("ffn", "resid")),
        TensorRule(L + r"mlp\.c_fc\.bias", vec("ffn")),
        TensorRule(L + r"mlp\.c_proj\.weight", linear("resid", "ffn")),
        TensorRule(L + r"mlp\.c_proj\.bias", vec("resid")),
        TensorRule(L + r"(input|post_attention)_layernorm\.(weight|bias)", vec("resid")),
        TensorRule(r"norm\.(weight|bias)", vec("resid")),
        *TAIL_RULES,
    ),
    geometry=attention_geometry,
)
