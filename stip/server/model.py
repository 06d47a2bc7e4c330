"""Load a server bundle as a stock transformers model: the server needs nothing but the protected checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from stip.common.bundles.manifest import listed_view, read_manifest
from stip.common.signing import Trusted
from stip.common.bundles.completeness import ROUND_TRIP, check_server_tensors, client_only, zeroed
from stip.common.layout import HEAD_CLIENT, HEAD_SERVER
from stip.errors import BundleError, TensorSetError


def load_protected_model(bundle: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                         trusted: Trusted = None, tee_worker: bool = False):
    """Verify the server bundle's signed manifest (against `trusted`, the developer's pinned signer(s); see
    `stip.common.signing`), then load it as the transformers class its config names (no custom code).

    The checkpoint has no real embedding table: transformers fills the input embedding with random values that are
    never used (every request brings its own embeddings), and we drop it to free the memory. Any other tensor
    transformers would fill or drop is refused, before loading (the shard headers) and after (its loading report):
    a model that loads with a random LM head serves garbage without an error. A server-decode bundle
    (manifest "mode") holds its permuted input embedding and keeps it. A `--head client` bundle (manifest "head")
    holds no LM head either: the model's head becomes the identity, so its "logits" are the final normed hidden
    state, which the client multiplies by the head it holds. transformers reads the bundle through a view of its
    signed files only (it prefers a `model.safetensors` to an index, whoever put it there).
    """
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    bundle = Path(bundle)
    manifest = read_manifest(bundle, role="server", trusted=trusted)
    config = AutoConfig.from_pretrained(bundle)
    from stip.common.tee.layout import TEE_WORKER_MODE, check_worker_mode

    check_worker_mode(bundle, manifest, tee_worker)  # a TEE worker bundle only as --tee-worker, and vice versa
    mode = manifest.get("mode", ROUND_TRIP)
    mode = ROUND_TRIP if mode == TEE_WORKER_MODE else mode  # its tensor set is a round-trip bundle's
    head = manifest.get("head", HEAD_SERVER)
    check_server_tensors(config, shard_shapes(bundle, manifest["files"]), where=f"server bundle {bundle}", mode=mode,
                         head=head)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its "embedding was newly initialized" report is expected; the rest is checked
    try:
        # GPT-2's reorder_and_upcast_attn acts in transformers' eager attention only (sdpa ignores it)
        eager = {"attn_implementation": "eager"} if getattr(config, "reorder_and_upcast_attn", False) else {}
        with listed_view(bundle, manifest["files"]) as signed_only:
            model, info = _model_class(config).from_pretrained(signed_only, dtype=dtype, output_loading_info=True,
                                                               **eager)
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_loading_info(bundle, config, info, mode, head)
    if head == HEAD_CLIENT:  # the random head transformers filled in goes: the "logits" are the hidden state
        model.set_output_embeddings(torch.nn.Identity())
    state = model.state_dict()
    for name in sorted(zeroed(config, state, mode)):
        if torch.count_nonzero(state[name]):
            raise TensorSetError(f"server bundle {bundle}: tensor {name!r} must be all zeros (the client adds it), "
                                 "but holds non-zero values")
    model = model.to(device).eval()
    # from_pretrained leaves the weights in a private memory map of the shards: copy them into ordinary process
    # memory. (A 0.972 decode ratio once blamed on the map was within run-to-run noise: docs/benchmarks.md.)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    if mode != ROUND_TRIP:
        logging.getLogger("stip.server").info("loaded protected %s model (%s), bundle %s",
                                              manifest.get("model_type"), mode, manifest["bundle_id"])
        return model, manifest
    emb = model.get_input_embeddings()
    if not isinstance(emb, torch.nn.Embedding):  # a patch embedding (ViT): the one-shot engine drops its module
        return model, manifest
    emb.weight = torch.nn.Parameter(torch.empty(0, emb.embedding_dim, dtype=dtype, device=device),
                                    requires_grad=False)
    logging.getLogger("stip.server").info("loaded protected %s model, bundle %s", manifest.get("model_type"),
                                          manifest["bundle_id"])
    return model, manifest


def _model_class(config):
    """The class the bundle's config names (a causal LM, or an encoder such as BertModel); transformers' own only."""
    import transformers

    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    return cls if cls is not None and hasattr(cls, "from_pretrained") else transformers.AutoModelForCausalLM


def shard_shapes(bundle: Path, signed_files) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the bundle's safetensors shards, from their headers; the shard index must
    name exactly those tensors, in shards the manifest covers (the index and shards are read only if listed)."""
    index = bundle / "model.safetensors.index.json"
    if index.name in signed_files:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise BundleError(f"{index} is not a shard index: {e}") from None
        shards = sorted(set(weight_map.values()))
    elif "model.safetensors" in signed_files:
        weight_map, shards = None, ["model.safetensors"]
    else:
        raise BundleError(f"server bundle {bundle} has no safetensors weights")
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        if shard not in signed_files:
            raise BundleError(f"server bundle {bundle}: shard {shard!r} is not listed in its manifest")
        with safe_open(str(bundle / shard), "pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
                if weight_map is not None and weight_map.get(name) != shard:
                    raise TensorSetError(f"server bundle {bundle}: tensor {name!r} in {shard} is not indexed there")
    for name in weight_map or ():
        if name not in shapes:
            raise TensorSetError(f"server bundle {bundle} lacks tensor {name!r}, which its shard index names")
    return shapes


def _check_loading_info(bundle: Path, config, info: dict, mode: str = ROUND_TRIP, head: str = HEAD_SERVER) -> None:
    """transformers' own report: only the input embedding (round-trip mode) and the LM head (--head client) may be
    missing; nothing unexpected or mismatched."""
    missing = set(info.get("missing_keys") or ()) - client_only(config, info.get("missing_keys") or (), mode, head)
    for kind, names in (("lacks tensor", missing), ("has unexpected tensor", info.get("unexpected_keys")),
                        ("has a wrong-shaped tensor", info.get("mismatched_keys")),
                        ("failed to load", info.get("error_msgs"))):
        if names:
            raise TensorSetError(f"server bundle {bundle} {kind} {sorted(map(str, names))[0]!r} "
                                 "(transformers' loading report)")
