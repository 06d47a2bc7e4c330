"""The transformers side of the client bundle, for the optional paths that run a model module on the client
(encoders' embeddings, ViT's patch embedding, LLaVA's vision tower): the transformers config, the module's plain
tensors, and the transformers tokenizer (batch padding for encoders). These need the full install (torch and
transformers); the generation path does not import this module."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from stip.common.bundles.manifest import listed_files
from stip.common.layout import CLIENT_MODULE_DIR, MODEL_CONFIG_FILE
from stip.errors import BundleError


def _cached(bundle, name: str, make):
    cache = bundle.__dict__.setdefault("_hf", {})
    if name not in cache:
        cache[name] = make()
    return cache[name]


def model_config(bundle):
    """The model's transformers config (shapes, no weights): what builds a client-side module."""
    def make():
        from transformers import AutoConfig

        d = json.loads((bundle.path / MODEL_CONFIG_FILE).read_text())
        return AutoConfig.for_model(d.pop("model_type"), **d)

    return _cached(bundle, "config", make)


def module_state(bundle) -> dict:
    """The plain tensors of the client-side module (BERT's embeddings, ViT's patch embedding, LLaVA's vision tower
    and projector), named inside that module; empty for decoders, whose client part is a table."""
    state: dict = {}
    for shard in listed_files(bundle.manifest, CLIENT_MODULE_DIR + "/", ".safetensors"):
        state |= load_file(str(bundle.path / shard))
    return state


def tokenizer(bundle):
    """The transformers tokenizer of the bundle (its signed files only): encoders pad batches with it."""
    def make():
        from transformers import AutoTokenizer

        if not bundle.has_tokenizer:
            raise BundleError(f"client bundle {bundle.path} has no tokenizer; pass token ids instead of text")
        with bundle.signed_view() as signed_only:
            return AutoTokenizer.from_pretrained(signed_only)

    return _cached(bundle, "tokenizer", make)
