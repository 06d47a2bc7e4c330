"""Mixtral-style sparse MoE decoders: LLaMA's attention, norms and embedding, and in each layer a router over
`num_local_experts` SwiGLU experts of which each token uses the top `num_experts_per_tok`.

The router's rows (one logit per expert) take the layer's secret expert order, and each expert's w1/w3 rows and w2
columns take that expert's own FFN permutation; expert e's tensors are then written as expert slot k where the
order puts it, so the server sees neither which expert is which nor their neurons' order. Routing decisions are
unchanged: the router scores the same experts, in slot numbering.

Names: the bundle keeps the per-expert names checkpoints and `save_pretrained` use
(`block_sparse_moe.experts.E.w1.weight`, `block_sparse_moe.gate.weight`); transformers fuses them into the class's
`mlp.experts.gate_up_proj` / `down_proj` on load. Hub checkpoints hold the same names.
"""

from stip.common.architectures.llama import (ATTENTION_RULES, LAYER, NORM_RULES, TAIL_RULES,
                                             TOKEN_EMBEDDING_RULE)
from stip.common.architectures.rules import Architecture, TensorRule, attention_geometry, linear

MOE = LAYER + r"block_sparse_moe\."
EXPERT = MOE + r"experts\.(?P<expert>\d+)\."

MOE_RULES = (
    TensorRule(MOE + r"gate\.weight", linear("expert", "resid")),  # router: one row per expert
    TensorRule(EXPERT + r"w[13]\.weight", linear("ffn", "resid")),  # gate and up projections
    TensorRule(EXPERT + r"w2\.weight", linear("resid", "ffn")),  # down projection
)


def _geometry(config):
    return attention_geometry(config, experts=config.num_local_experts)


MIXTRAL = Architecture(
    model_types=("mixtral",),
    base_prefix="model.",
    rules=(TOKEN_EMBEDDING_RULE, *ATTENTION_RULES, *MOE_RULES, *NORM_RULES, *TAIL_RULES),
    geometry=_geometry,
    saved_names=True,
)
