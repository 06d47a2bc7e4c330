"""LLaMA-style decoders (LLaMA, Mistral, Qwen2): RoPE, RMSNorm, SwiGLU, grouped-query attention, optional QKV
biases and tied embeddings. The client embeds tokens; the server runs every block and the LM head."""

from stip.developer.architectures.rules import (CLIENT, DROP, TOKEN_EMBEDDING, Architecture, TensorRule,
                                                LM_HEAD_RULE, attention_geometry, linear, vec)

L = r"layers\.(?P<layer>\d+)\."

LLAMA = Architecture(
    model_types=("llama", "mistral", "qwen2"),
    base_prefix="model.",
    rules=(
        TensorRule(r"embed_tokens\.weight", {1: ("resid", "out")}, CLIENT, "token", role=TOKEN_EMBEDDING),
        TensorRule(L + r"self_attn\.q_proj\.weight", linear("attn_q", "resid")),
        TensorRule(L + r"self_attn\.k_proj\.weight", linear("attn_k", "resid")),
        TensorRule(L + r"self_attn\.v_proj\.weight", linear("attn_v", "resid")),
        TensorRule(L + r"self_attn\.q_proj\.bias", vec("attn_q")),
        TensorRule(L + r"self_attn\.k_proj\.bias", vec("attn_k")),
        TensorRule(L + r"self_attn\.v_proj\.bias", vec("attn_v")),
        TensorRule(L + r"self_attn\.o_proj\.weight", linear("resid", "attn_o")),
        TensorRule(L + r"self_attn\.o_proj\.bias", vec("resid")),
        TensorRule(L + r"mlp\.(gate|up)_proj\.weight", linear("ffn", "resid")),
        TensorRule(L + r"mlp\.(gate|up)_proj\.bias", vec("ffn")),
        TensorRule(L + r"mlp\.down_proj\.weight", linear("resid", "ffn")),
        TensorRule(L + r"mlp\.down_proj\.bias", vec("resid")),
        TensorRule(L + r"(input|post_attention)_layernorm\.weight", vec("resid")),
        TensorRule(r"norm\.weight", vec("resid")),
        LM_HEAD_RULE,
        TensorRule(L + r"self_attn\.rotary_emb\.inv_freq", party=DROP),
    ),
    geometry=attention_geometry,
)
