"""Load a server bundle as a stock transformers model: the server needs nothing but the protected checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from stip.common.files import read_manifest
from stip.common.signing import Trusted


def load_protected_model(bundle: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                         trusted: Trusted = None):
    """Verify the server bundle's signed manifest (against `trusted`, the developer's pinned signer(s); see
    `stip.common.signing`), then load it with `AutoModelForCausalLM` (no custom code).

    The checkpoint has no real embedding table: transformers fills the input embedding with random values that are
    never used (every request brings its own embeddings), and we drop it to free the memory.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bundle = Path(bundle)
    manifest = read_manifest(bundle, role="server", trusted=trusted)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "embedding was newly initialized" report is expected
    try:
        model = AutoModelForCausalLM.from_pretrained(bundle, dtype=dtype).to(device).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    # from_pretrained leaves the weights in a private memory map of the shards: copy them into ordinary process
    # memory. (A 0.972 decode ratio once blamed on the map was within run-to-run noise: docs/benchmarks.md.)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    emb = model.get_input_embeddings()
    emb.weight = torch.nn.Parameter(torch.empty(0, emb.embedding_dim, dtype=dtype, device=device),
                                    requires_grad=False)
    logging.getLogger("stip.server").info("loaded protected %s model, bundle %s", manifest.get("model_type"),
                                          manifest["bundle_id"])
    return model, manifest
