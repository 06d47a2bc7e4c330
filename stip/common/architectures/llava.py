"""LLaVA-style vision-language models: a vision tower and a projector in front of a LLaMA-style language model.

The client runs the vision tower and the multi-modal projector (plain weights, in its module shards) and puts the
projector's output into the language model's `p` basis at the image-token positions; the server bundle is just the
language model, a standard decoder checkpoint (`LlamaForCausalLM`, ...) served as any other decoder session.

Names: `LlavaForConditionalGeneration` holds `model.language_model.…`, `model.vision_tower.…`,
`model.multi_modal_projector.…` and `lm_head.weight`; `save_pretrained` (and hub checkpoints) write the older
`language_model.model.…`, `language_model.lm_head.weight`, `vision_tower.…` and `multi_modal_projector.…`. Both
are read; the server bundle gets the language model class's own names (`model.layers.…`, `lm_head.weight`), the
client's module shards `vision_tower.…` and `multi_modal_projector.…`.
"""

import copy

from stip.common.tasks import IMAGE_TEXT_TO_TEXT
from stip.common.architectures.llama import (ATTENTION_RULES, LLAMA, MLP_RULES, NORM_RULES, TAIL_RULES,
                                             TOKEN_EMBEDDING_RULE)
from stip.common.architectures.rules import (CLIENT, LM_HEAD, LM_HEAD_RULE, Architecture, TensorRule,
                                             attention_geometry, linear)
from stip.errors import UnsupportedModelError


def text_config(config):
    """The language model's config, refused unless the LLaMA rules cover it."""
    text = config.text_config
    if text.model_type not in LLAMA.model_types:
        raise UnsupportedModelError(f"LLaVA's language model is a {text.model_type!r} model; supported language "
                                    f"models: {', '.join(LLAMA.model_types)}")
    return text


def server_config(config):
    """What the server runs: the language model alone, as its own causal-LM class."""
    text = copy.deepcopy(text_config(config))
    text.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
    return text


LLAVA = Architecture(
    model_types=("llava",),
    base_prefix="model.",
    renames=((r"^language_model\.model\.", ""), (r"^language_model\.", "")),
    rules=(
        TOKEN_EMBEDDING_RULE, *ATTENTION_RULES, *MLP_RULES, *NORM_RULES,
        TensorRule(r"(language_model\.)?lm_head\.weight", linear("vocab", "resid"), role=LM_HEAD, in_base=False,
                   name=LM_HEAD_RULE.name),
        *(r for r in TAIL_RULES if r.role != LM_HEAD),
        TensorRule(r"(vision_tower|multi_modal_projector)\..+", party=CLIENT, client_module=""),
    ),
    geometry=lambda config: attention_geometry(text_config(config)),
    task=lambda config: IMAGE_TEXT_TO_TEXT,
    server_config=server_config,
)
