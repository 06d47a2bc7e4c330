"""The enclave bundle's tensors, taken from a `stip protect` output's standard server and client bundles: the
developer's side of TEE mode, named as stip.enclave.compute reads them (stip.common.tee.layout)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stip.common.bundles.manifest import read_manifest
from stip.common.keys import ClientKey
from stip.common.layout import CLIENT_CONFIG_FILE, CLIENT_DIR, CLIENT_KEY_FILE, EMBEDDING_FILE, SERVER_DIR
from stip.common.tee.blocks import config_of, skeleton
from stip.common.tee.layout import (BLOCK_PREFIX, EMBEDDING_SCALE, FINAL_NORM_PREFIX, LM_HEAD_PREFIX,
                                    POSITION_EMBEDDING, RESID, TOKEN_EMBEDDING, VOCAB)
from stip.errors import BundleError, KeyMismatchError


def enclave_tensors(server_state: dict[str, torch.Tensor], config, client_key, embedding: dict[str, torch.Tensor],
                    embedding_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """What the enclave holds, named as `EnclaveModel.from_tensors` reads it: `p` and `pc` (the client key), the
    plain embedding table (and GPT-2's positions), the PERMUTED block-0 weights, final norm and LM head (as the
    server bundle holds them), to which `stip protect --tee` adds the worker's secret bases (stip.developer.tee)."""
    config = config_of(config)
    _, base, layers_attr, norm_attr, prefix = skeleton(config)
    out = {f"{name}.{k}": v.contiguous() for name, perm in ((RESID, client_key.resid), (VOCAB, client_key.vocab))
           for k, v in (("perm", perm.perm), ("sign", perm.sign)) if v is not None}
    out[TOKEN_EMBEDDING] = embedding["token"].contiguous()
    if "position" in embedding:
        out[POSITION_EMBEDDING] = embedding["position"].contiguous()
    out[EMBEDDING_SCALE] = torch.tensor(float(embedding_scale))
    wanted = {f"{prefix}{layers_attr}.0.": BLOCK_PREFIX, f"{prefix}{norm_attr}.": FINAL_NORM_PREFIX,
              "lm_head.": LM_HEAD_PREFIX}
    for name, t in server_state.items():
        for src, dst in wanted.items():
            if name.startswith(src):
                out[dst + name[len(src):]] = t.contiguous()
    for dst in wanted.values():
        if not any(k.startswith(dst) for k in out):
            raise ValueError(f"the server state holds no tensor for the enclave's {dst.rstrip('.')}")
    params = {n for n, _ in getattr(base, layers_attr)[0].named_parameters()}
    missing = sorted(params - {k[len(BLOCK_PREFIX):] for k in out if k.startswith(BLOCK_PREFIX)})
    if missing:  # e.g. MoE experts, stored per expert in checkpoints and fused in the modules
        raise ValueError(f"TEE mode does not support {config.model_type} yet: block 0's checkpoint tensors do not "
                         f"match its module's parameters (no {missing[0]!r})")
    return out


def enclave_tensors_from_bundles(out: str | Path, trusted=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model config dict, enclave tensors) from a `stip protect` output folder's STANDARD server bundle and client
    bundle (both signature-checked), before `stip protect --tee` turns the server bundle into the worker's: block 0,
    the final norm and the LM head are read from the server shards, nothing else. Without the worker's masks."""
    from safetensors import safe_open

    out = Path(out)
    key, client_config, embedding = _client_parts(out / CLIENT_DIR, trusted)
    server = out / SERVER_DIR
    manifest = read_manifest(server, role="server", trusted=trusted)
    config = json.loads((server / "config.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(f for f in manifest["files"] if f.endswith(".safetensors")):
        with safe_open(str(server / shard), "pt") as f:
            for name in f.keys():
                if ".0." in name or "norm" in name or "ln_f" in name or name.startswith("lm_head"):
                    state[name] = f.get_tensor(name)
    return config, enclave_tensors(state, config, key, embedding, float(client_config.get("embedding_scale", 1.0)))


def _client_parts(client: Path, trusted) -> tuple[ClientKey, dict, dict[str, torch.Tensor]]:
    """The client bundle's key, config and plain embedding tables ("token", "position" if any), checked as the
    client checks them: the signed manifest, the key's bundle id and fingerprint."""
    from safetensors.torch import load_file

    manifest = read_manifest(client, role="client", trusted=trusted)
    key_path = client / CLIENT_KEY_FILE
    key = ClientKey.load(key_path)
    key.check_belongs_to(manifest["bundle_id"], f"client bundle {client}")
    if key.fingerprint != manifest.get("client_key_fingerprint"):
        raise KeyMismatchError(f"client key {key_path} has fingerprint {key.fingerprint}, but the signed manifest "
                               f"of {client} names {manifest.get('client_key_fingerprint')}: the key file was swapped")
    config = json.loads((client / CLIENT_CONFIG_FILE).read_text())
    embedding = {name: load_file(str(client / f))["weight"] for name in ("token", "position")
                 if (f := EMBEDDING_FILE.format(name)) in manifest["files"]}
    if "token" not in embedding:
        raise BundleError(f"client bundle {client} holds no token embedding")
    return key, config, embedding
