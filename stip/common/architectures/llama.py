"""LLaMA-style decoders (LLaMA, Mistral, Qwen2): RoPE, RMSNorm, SwiGLU, grouped-query attention, optional QKV
biases and tied embeddings. The client embeds tokens; the server runs every block and the LM head.

The rule groups are public so that families built from the same blocks (Mixtral, Qwen3, Gemma) reuse them instead of
copying the table: `LAYER` (the per-layer name prefix), `TOKEN_EMBEDDING_RULE`, `ATTENTION_RULES`, `MLP_RULES`,
`NORM_RULES` and `TAIL_RULES` (the LM head and the rebuilt rotary buffer)."""

from stip.common.architectures.rules import (CLIENT, DROP, TOKEN_EMBEDDING, Architecture, NormFold, TensorRule,
                                             LM_HEAD_RULE, attention_geometry, linear, vec)

LAYER = r"layers\.(?P<layer>\d+)\."
L = LAYER

TOKEN_EMBEDDING_RULE = TensorRule(r"embed_tokens\.weight", {1: ("resid", "out")}, CLIENT, "token",
                                  role=TOKEN_EMBEDDING)
ATTENTION_RULES = (
    TensorRule(L + r"self_attn\.q_proj\.weight", linear("attn_q", "resid")),
    TensorRule(L + r"self_attn\.k_proj\.weight", linear("attn_k", "resid")),
    TensorRule(L + r"self_attn\.v_proj\.weight", linear("attn_v", "resid")),
    TensorRule(L + r"self_attn\.q_proj\.bias", vec("attn_q")),
    TensorRule(L + r"self_attn\.k_proj\.bias", vec("attn_k")),
    TensorRule(L + r"self_attn\.v_proj\.bias", vec("attn_v")),
    TensorRule(L + r"self_attn\.o_proj\.weight", linear("resid", "attn_o")),
    TensorRule(L + r"self_attn\.o_proj\.bias", vec("resid")),
)
MLP_RULES = (
    TensorRule(L + r"mlp\.gate_proj\.weight", linear("ffn", "resid")),
    TensorRule(L + r"mlp\.up_proj\.weight", linear("ffn_up", "resid")),
    TensorRule(L + r"mlp\.gate_proj\.bias", vec("ffn")),
    TensorRule(L + r"mlp\.up_proj\.bias", vec("ffn_up")),
    TensorRule(L + r"mlp\.down_proj\.weight", linear("resid", "ffn_up")),
    TensorRule(L + r"mlp\.down_proj\.bias", vec("resid")),
)
NORM_RULES = (
    TensorRule(L + r"(input|post_attention)_layernorm\.weight", vec("resid")),
    TensorRule(r"norm\.weight", vec("resid")),
)
TAIL_RULES = (
    LM_HEAD_RULE,
    TensorRule(L + r"self_attn\.rotary_emb\.inv_freq", party=DROP),
)

_B = "model.layers.{layer}."
NORM_FOLDS = (  # --harden mix: which norm feeds which linears (the final norm: the LM head)
    NormFold(_B + "input_layernorm", tuple(_B + f"self_attn.{x}_proj" for x in "qkv")),
    NormFold(_B + "post_attention_layernorm", (_B + "mlp.gate_proj", _B + "mlp.up_proj")),
    NormFold("model.norm", ("lm_head",)),
)

LLAMA = Architecture(
    model_types=("llama", "mistral", "qwen2"),
    base_prefix="model.",
    rules=(TOKEN_EMBEDDING_RULE, *ATTENTION_RULES, *MLP_RULES, *NORM_RULES, *TAIL_RULES),
    geometry=attention_geometry,
    harden=("mix", "rope", "vo", "ffn"),
    norm_folds=NORM_FOLDS,
)
