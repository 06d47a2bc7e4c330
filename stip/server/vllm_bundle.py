"""The bundle `stip serve --engine vllm` hands to vLLM, checked first: its signed manifest and exact tensor set are
verified as for the transformers engine (`stip.server.model`) before vLLM sees any file, and vLLM's options are
settled for the platform it was built for (`open_vllm_bundle`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stip.common.bundles.manifest import MANIFEST_NAME
from stip.errors import StipError
from stip.server.vllm_options import _import_vllm, _on_cpu, cpu_env_defaults


def _verified_config(bundle: Path, trusted):
    """The signed manifest (signature, signer pin, every file's sha256) and the exact tensor set, as
    `stip.server.model.load_protected_model` checks them; -> (manifest, transformers config, tensor shapes)."""
    from transformers import AutoConfig

    from stip.common.bundles.manifest import read_manifest
    from stip.common.bundles.completeness import ROUND_TRIP, check_server_tensors, zeroed
    from stip.server.model import shard_shapes

    manifest = read_manifest(bundle, role="server", trusted=trusted)
    from stip.common.tee.layout import check_worker_mode

    check_worker_mode(bundle, manifest, tee_worker=False)  # a TEE worker bundle runs only as --tee-worker
    refuse_head_client(bundle, manifest)
    config = AutoConfig.from_pretrained(bundle)
    mode = manifest.get("mode", ROUND_TRIP)
    shapes = shard_shapes(bundle, manifest["files"])
    check_server_tensors(config, shapes, where=f"server bundle {bundle}", mode=mode)
    for name in sorted(zeroed(config, shapes, mode)):
        if torch.count_nonzero(_read_tensor(bundle, name)):
            from stip.errors import TensorSetError

            raise TensorSetError(f"server bundle {bundle}: tensor {name!r} must be all zeros (the client adds it), "
                                 "but holds non-zero values")
    return manifest, config, shapes


def refuse_head_client(bundle: Path, manifest: dict | None = None) -> None:
    """vLLM cannot serve a `--head client` bundle: refused by name (before vLLM is imported, from the manifest as
    written; again once its signature is checked)."""
    if manifest is None:
        try:
            manifest = json.loads((bundle / MANIFEST_NAME).read_text())
        except (OSError, ValueError):
            return  # not readable here: the verified read names what is wrong
    if isinstance(manifest, dict) and manifest.get("head", "server") != "server":
        raise StipError(f"server bundle {bundle} holds no LM head (stip protect --head client): its server returns "
                        "the final hidden state of each step, which vLLM's generation API does not return (it "
                        "samples from logits and reports log-probabilities only); serve it with --engine "
                        "transformers (docs/head-client.md)")


def _weight_map(bundle: Path) -> dict[str, str]:
    index = bundle / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    with safe_open(str(bundle / "model.safetensors"), "pt") as f:
        return {name: "model.safetensors" for name in f.keys()}


def _read_tensor(bundle: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(bundle / _weight_map(bundle)[name]), "pt") as f:
        return f.get_tensor(name)


def open_vllm_bundle(bundle, device: str = "cpu", options: dict | None = None, trusted=None):
    """Before `stip serve --engine vllm` starts vLLM (`stip.server.engines.load_vllm_engine`): verify the bundle and
    settle vLLM's options. `options` are vLLM engine arguments (tensor_parallel_size, max_num_seqs, ...). `device` is
    vLLM's to pick (the platform it was built for); a CPU build gets the CPU defaults here. Returns (bundle path,
    manifest, config, shapes, options, whether the bundle is server-decode)."""
    from stip.common.bundles.completeness import ROUND_TRIP, SERVER_DECODE

    refuse_head_client(Path(bundle))
    _import_vllm()
    options = dict(options or {})
    if _on_cpu():
        cpu_env_defaults(options)
    if device not in ("cpu", "cuda") and not device.startswith("cuda"):
        raise StipError(f"--engine vllm runs on the platform vLLM was built for; --device {device!r} is not one")
    bundle = Path(bundle)
    manifest, config, shapes = _verified_config(bundle, trusted)
    mode = manifest.get("mode", ROUND_TRIP)
    return bundle, manifest, config, shapes, options, mode == SERVER_DECODE
