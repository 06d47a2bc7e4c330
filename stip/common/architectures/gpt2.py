"""GPT-2: learned absolute positions (a client table the server holds as zeros), LayerNorm, GeLU, Conv1D layers
stored `[in, out]`, and a fused Q|K|V projection."""

from stip.common.keys import Geometry
from stip.common.architectures.rules import (CLIENT, DROP, TOKEN_EMBEDDING, Architecture, NormFold, TensorRule,
                                             conv1d, vec)
from stip.common.architectures.rules import LM_HEAD_RULE


def _geometry(config) -> Geometry:
    heads = config.n_head
    return Geometry(hidden=config.n_embd, vocab=config.vocab_size, layers=config.n_layer, heads=heads,
                    kv_heads=heads, head_dim=config.n_embd // heads, ffn=config.n_inner or 4 * config.n_embd,
                    rope=False)


H = r"h\.(?P<layer>\d+)\."

GPT2 = Architecture(
    model_types=("gpt2",),
    base_prefix="transformer.",
    rules=(
        TensorRule(r"wte\.weight", {1: ("resid", "out")}, CLIENT, "token", role=TOKEN_EMBEDDING),
        TensorRule(r"wpe\.weight", {1: ("resid", "out")}, CLIENT, "position", zeroed_on_server=True),
        TensorRule(H + r"ln_[12]\.(weight|bias)", vec("resid")),
        TensorRule(H + r"attn\.c_attn\.weight", conv1d("attn_qkv", "resid")),
        TensorRule(H + r"attn\.c_attn\.bias", vec("attn_qkv")),
        TensorRule(H + r"attn\.c_proj\.weight", conv1d("resid", "attn_o")),
        TensorRule(H + r"attn\.c_proj\.bias", vec("resid")),
        TensorRule(H + r"mlp\.c_fc\.weight", conv1d("ffn", "resid")),
        TensorRule(H + r"mlp\.c_fc\.bias", vec("ffn")),
        TensorRule(H + r"mlp\.c_proj\.weight", conv1d("resid", "ffn")),
        TensorRule(H + r"mlp\.c_proj\.bias", vec("resid")),
        TensorRule(r"ln_f\.(weight|bias)", vec("resid")),
        LM_HEAD_RULE,
        TensorRule(H + r"attn\.(masked_)?bias", party=DROP),
    ),
    geometry=_geometry,
    rope=False,
    # --harden: no "ffn" (GELU admits no exact rescaling of its input); "rope" is a dense orthogonal map per head
    # (no RoPE to commute with); "mix" folds each LayerNorm's gamma into its consumers and beta into their biases
    harden=("mix", "rope", "vo"),
    norm_folds=(
        NormFold("transformer.h.{layer}.ln_1", ("transformer.h.{layer}.attn.c_attn",)),
        NormFold("transformer.h.{layer}.ln_2", ("transformer.h.{layer}.mlp.c_fc",)),
        NormFold("transformer.ln_f", ("lm_head",), keep_bias=True),
    ),
    layer_norm=True,
)
