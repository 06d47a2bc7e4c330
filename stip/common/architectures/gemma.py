"""Gemma 3 (text): LLaMA-style blocks with Gemma's quirks.

- The embedding module scales token embeddings by sqrt(hidden_size) inside the model
  (`Gemma3TextScaledWordEmbedding`). The server runs from embeddings and never sees that module, so the client
  applies the scale (`embedding_scale`, written to stip_client.json and applied by `ClientBundle`).
- RMSNorm multiplies by (1 + weight): a permuted weight still gives the permuted output.
- Four norms per layer: input, post-attention (on the attention output, before the residual add), pre- and
  post-feedforward; all over the residual stream, so all take `p`.
- Q/K RMSNorm over head dims, one weight for all heads, as Qwen3 (`Geometry.qk_norm`, see qwen3.py).
- GeGLU (gelu_tanh(gate) * up) acts per neuron: the FFN permutation covers it as it covers SwiGLU.
- Sliding-window and full-attention layers alternate, each with its own RoPE base: the mask depends only on
  positions and the quarter-turn rotations commute with RoPE at any frequency, so both layer kinds stay exact.
- Attention and final logit soft-capping (if set) act elementwise on scores and logits: permutations pass through.
"""

import math
from functools import partial

from stip.common.architectures.llama import (ATTENTION_RULES, LAYER, MLP_RULES, NORM_RULES, TAIL_RULES,
                                             TOKEN_EMBEDDING_RULE)
from stip.common.architectures.qwen3 import QK_NORM_RULES
from stip.common.architectures.rules import Architecture, TensorRule, attention_geometry, vec


def sqrt_hidden(config) -> float:
    return math.sqrt(config.hidden_size)


GEMMA3 = Architecture(
    model_types=("gemma3_text",),
    base_prefix="model.",
    rules=(
        TOKEN_EMBEDDING_RULE,
        *ATTENTION_RULES,
        *QK_NORM_RULES,
        *MLP_RULES,
        TensorRule(LAYER + r"(pre|post)_feedforward_layernorm\.weight", vec("resid")),
        *NORM_RULES,
        *TAIL_RULES,
    ),
    geometry=partial(attention_geometry, qk_norm=True),
    embedding_scale=sqrt_hidden,
    server_class=lambda config: "Gemma3ForCausalLM",  # its config class is Gemma3TextConfig
)
