"""Qwen3-MoE: Qwen3's attention (Q/K RMSNorm over head dims) and, in each sparse layer, a router over
`num_experts` SwiGLU experts of `moe_intermediate_size` neurons, top `num_experts_per_tok` per token (their weights
renormalized or not, `norm_topk_prob`: either way a function of the selected experts' scores, so unchanged).

As for Mixtral: the router's rows take the layer's secret expert order, each expert's gate/up rows and down columns
its own FFN permutation, and expert e is written as the slot k where that order puts it; the bundle keeps the
per-expert names `save_pretrained` writes (`mlp.experts.E.gate_proj.weight`), which transformers fuses on load.
Dense layers (`mlp_only_layers`, `decoder_sparse_step`) take the layer's own FFN permutation, of `intermediate_size`;
the experts' permutations have `moe_intermediate_size` (`Geometry.expert_ffn`).
"""

from stip.common.architectures.llama import (ATTENTION_RULES, LAYER, MLP_RULES, NORM_RULES, TAIL_RULES,
                                             TOKEN_EMBEDDING_RULE)
from stip.common.architectures.qwen3 import QK_NORM_RULES
from stip.common.architectures.rules import Architecture, TensorRule, attention_geometry, linear

EXPERT = LAYER + r"mlp\.experts\.(?P<expert>\d+)\."

MOE_RULES = (
    TensorRule(LAYER + r"mlp\.gate\.weight", linear("expert", "resid")),  # router: one row per expert
    TensorRule(EXPERT + r"(gate|up)_proj\.weight", linear("ffn", "resid")),
    TensorRule(EXPERT + r"down_proj\.weight", linear("resid", "ffn")),
)


def _geometry(config):
    return attention_geometry(config, experts=config.num_experts, expert_ffn=config.moe_intermediate_size,
                              qk_norm=True)


QWEN3_MOE = Architecture(
    model_types=("qwen3_moe",),
    base_prefix="model.",
    rules=(TOKEN_EMBEDDING_RULE, *ATTENTION_RULES, *QK_NORM_RULES, *MOE_RULES, *MLP_RULES, *NORM_RULES,
           *TAIL_RULES),
    geometry=_geometry,
    saved_names=True,
)
