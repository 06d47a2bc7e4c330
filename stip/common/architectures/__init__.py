"""Per-architecture protection rules, as data: one small module per family, registered here.

`rules` holds the shape of a table (which tensor gets which transform on which axis, and which party gets it); each
family module holds one table plus how to read its key's shapes and its task from a transformers config. Adding a
family means adding its module and one line in `ARCHITECTURES`; a model type no table covers is refused by name.
Shared (common): the developer protects by these tables, and the server reads from them which tensors its bundle
must hold and which are the client's (`stip.common.bundles.completeness`) and what task a bundle serves (`task_of`).
"""

from __future__ import annotations

from stip.common.keys import Geometry
from stip.common.architectures.bert import BERT
from stip.common.architectures.distilbert import DISTILBERT
from stip.common.architectures.gemma import GEMMA3
from stip.common.architectures.gpt2 import GPT2
from stip.common.architectures.llama import LLAMA
from stip.common.architectures.llava import LLAVA
from stip.common.architectures.mixtral import MIXTRAL
from stip.common.architectures.phi3 import PHI3
from stip.common.architectures.qwen2_moe import QWEN2_MOE
from stip.common.architectures.qwen3 import QWEN3
from stip.common.architectures.qwen3_moe import QWEN3_MOE
from stip.common.architectures.roberta import ROBERTA
from stip.common.architectures.starcoder2 import STARCODER2
from stip.common.architectures.rules import (CLIENT, DROP, LM_HEAD, LM_HEAD_RULE, SERVER, TOKEN_EMBEDDING,
                                             Architecture, Placement, RuleMatch, TensorRule)
from stip.common.architectures.vit import VIT
from stip.errors import UnsupportedModelError

ARCHITECTURES: tuple[Architecture, ...] = (LLAMA, GPT2, QWEN3, PHI3, GEMMA3, VIT, MIXTRAL, QWEN3_MOE, QWEN2_MOE, LLAVA,
                                           BERT, ROBERTA, DISTILBERT, STARCODER2)
SUPPORTED = tuple(t for a in ARCHITECTURES for t in a.model_types)

__all__ = ["ARCHITECTURES", "CLIENT", "DROP", "GPT2", "LLAMA", "LM_HEAD", "LM_HEAD_RULE", "SERVER", "SUPPORTED",
           "TOKEN_EMBEDDING", "Architecture", "Placement", "RuleMatch", "TensorRule", "architecture_for",
           "embedding_scale_of", "geometry_of", "task_of"]


def architecture_for(config) -> Architecture:
    model_type = getattr(config, "model_type", None)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch.for_config(config)
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported; supported model types: {', '.join(SUPPORTED)}")


def geometry_of(config) -> Geometry:
    """Read the shapes a key must match from a transformers config, refusing layouts the rules do not cover."""
    return architecture_for(config).geometry(config)


def task_of(config) -> str:
    """The Hugging Face pipeline task the checkpoint serves (stip.common.tasks)."""
    return architecture_for(config).task(config)


def embedding_scale_of(config) -> float:
    """The factor the model's embedding module multiplies token embeddings by (1.0 for most; Gemma: sqrt(hidden)),
    which the client applies since the server runs from embeddings."""
    scale = architecture_for(config).embedding_scale
    return 1.0 if scale is None else float(scale(config))
