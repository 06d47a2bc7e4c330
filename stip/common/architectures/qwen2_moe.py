"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (QKV biases) and, in each sparse layer, routed
experts as in Qwen3-MoE (`mlp.gate`, `mlp.experts.E.*_proj`) plus one shared expert that every token uses, scaled by
a sigmoid gate (`mlp.shared_expert_gate`, one output: its input is the residual stream, in `p`).

The shared expert's neurons take the layer's FFN permutation, of `shared_expert_intermediate_size`; the routed
experts' their own, of `moe_intermediate_size`. A dense layer (`mlp_only_layers`, `decoder_sparse_step`) takes the
layer's FFN permutation too, so it must have the shared expert's width; a config where it does not is refused.
"""

from stip.common.architectures.llama import (ATTENTION_RULES, LAYER, MLP_RULES, NORM_RULES, TAIL_RULES,
                                             TOKEN_EMBEDDING_RULE)
from stip.common.architectures.qwen3_moe import MOE_RULES
from stip.common.architectures.rules import Architecture, TensorRule, attention_geometry, linear
from stip.errors import UnsupportedModelError

SHARED = LAYER + r"mlp\.shared_expert\."

SHARED_EXPERT_RULES = (
    TensorRule(SHARED + r"(gate|up)_proj\.weight", linear("ffn", "resid")),
    TensorRule(SHARED + r"down_proj\.weight", linear("resid", "ffn")),
    TensorRule(LAYER + r"mlp\.shared_expert_gate\.weight", {1: ("resid", "in")}),  # [1, d]: one gate per token
)


def _geometry(config):
    shared = config.shared_expert_intermediate_size
    dense = [i for i in range(config.num_hidden_layers)
             if i in (config.mlp_only_layers or []) or (i + 1) % config.decoder_sparse_step]
    if dense and config.intermediate_size != shared:
        raise UnsupportedModelError(
            f"qwen2_moe with dense layers {dense} of intermediate_size {config.intermediate_size} beside a shared "
            f"expert of {shared} is not supported (one FFN permutation width per layer key)")
    return attention_geometry(config, ffn=shared, experts=config.num_experts,
                              expert_ffn=config.moe_intermediate_size)


QWEN2_MOE = Architecture(
    model_types=("qwen2_moe",),
    base_prefix="model.",
    rules=(TOKEN_EMBEDDING_RULE, *ATTENTION_RULES, *MOE_RULES, *SHARED_EXPERT_RULES, *MLP_RULES, *NORM_RULES,
           *TAIL_RULES),
    geometry=_geometry,
    saved_names=True,
)
