"""The transformers side of the client bundle, for the image paths that run a model module on the client (ViT's
patch embedding, LLaVA's vision tower): the transformers config and the module's plain tensors. These need the
`stip[vision]` extra (torch, transformers); the light client's paths, text encoders included (numpy:
`stip.client.encoder`), do not import this module."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from stip.common.bundles.manifest import listed_files
from stip.common.layout import CLIENT_MODULE_DIR, MODEL_CONFIG_FILE


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

