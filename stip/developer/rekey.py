"""`stip rekey`: a fresh key and bundle for a model protected before, with the same options.

A permutation key is a fixed substitution: one known (x, x p) pair pins most of `p`, and token codes repeat across
requests. So keys must rotate. Rekeying is `stip protect` again (`stip.developer.protect.protect`: a fresh key from the
CSPRNG, a fresh bundle id, a complete new folder written atomically) with what the old bundle records repeated: its
mode and hardening options, and its developer's signing key (so users' pinned signer still holds). Before anything is
written the model is checked against the old bundle: the key's shapes, the model type, the model config the client
bundle holds, and, where the client bundle holds the plaintext token embedding (round-trip mode), its values, so a
different fine-tune of the same architecture is refused too. TEE deployments are refused: their users hold no key,
and rekey does not issue TEE bundles (`stip protect --tee` does).
Serve the old and the new bundle side by side while clients move over (docs/contexts.md).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from stip.common.bundles.manifest import read_manifest
from stip.common.keys import ClientKey, DeveloperKey
from stip.common.layout import (CLIENT_CONFIG_FILE, CLIENT_DIR, CLIENT_KEY_FILE, DEVELOPER_DIR, DEVELOPER_KEY_FILE,
                                EMBEDDING_FILE, MODEL_CONFIG_FILE)
from stip.common.signing import SIGNING_KEY_FILE, Trusted
from stip.common.architectures import architecture_for, geometry_of
from stip.developer.checkpoint import Checkpoint
from stip.developer.protect import ProtectResult, protect
from stip.errors import BundleError, KeyMismatchError, StipError

# Config fields that name where or with which library version a model was saved, not what it is.
VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype",
                                  "_attn_implementation_autoset", "_commit_hash"})
TEE_DIRS = ("enclave", "tee-client")


def old_options(old: Path, trusted: Trusted = None) -> dict:
    """What the protected folder `old` was protected with: {"mode", "harden", "head", "noise", "model_type",
    "bundle_id", "tee"}, from its developer manifest (signature and file hashes checked) and its client config."""
    developer = old / DEVELOPER_DIR
    if not (developer / DEVELOPER_KEY_FILE).is_file():
        raise BundleError(f"{old} holds no developer bundle ({DEVELOPER_DIR}/{DEVELOPER_KEY_FILE}): rekey needs the "
                          f"folder `stip protect --out` wrote, with its developer key and signing key")
    manifest = read_manifest(developer, role="developer", trusted=trusted)
    config: dict = {}
    if (old / CLIENT_DIR / CLIENT_CONFIG_FILE).is_file():
        config = json.loads((old / CLIENT_DIR / CLIENT_CONFIG_FILE).read_text())
    harden = manifest.get("harden", config.get("harden")) or []
    harden = harden.split(",") if isinstance(harden, str) else list(harden)
    return {"mode": manifest.get("mode", config.get("mode", "round-trip")), "harden": tuple(harden),
            "head": manifest.get("head", config.get("head", "server")),
            "noise": float(manifest.get("noise", config.get("noise")) or 0.0),
            "model_type": manifest.get("model_type"), "bundle_id": manifest.get("bundle_id"),
            "tee": [d + "/" for d in TEE_DIRS if (old / d).exists()]}


def _plain(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}


def check_same_model(ck: Checkpoint, old: Path, options: dict) -> None:
    """Raise KeyMismatchError unless `ck` is the model the bundle in `old` was protected from."""
    what = f"{ck.path} is not the model the bundle in {old} was protected from"
    if options.get("model_type") and options["model_type"] != ck.config.model_type:
        raise KeyMismatchError(f"{what}: it is a {ck.config.model_type} model, the bundle a {options['model_type']} "
                               f"model")
    old_key = DeveloperKey.load(old / DEVELOPER_DIR / DEVELOPER_KEY_FILE)
    try:
        old_key.check_matches(geometry_of(ck.config))
    except KeyMismatchError as e:
        raise KeyMismatchError(f"{what}: {e}") from None
    config_file = old / CLIENT_DIR / MODEL_CONFIG_FILE
    if config_file.is_file():
        before = _plain(json.loads(config_file.read_text()))
        now = _plain(json.loads(json.dumps(ck.config.to_dict())))
        differ = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        if differ:
            raise KeyMismatchError(f"{what}: its config differs in {', '.join(differ[:8])}"
                                   f"{' ...' if len(differ) > 8 else ''}")
    table = old / CLIENT_DIR / EMBEDDING_FILE.format("token")
    if table.is_file():
        _check_embedding(ck, load_file(str(table))["weight"], old, what)


def _check_embedding(ck: Checkpoint, stored: torch.Tensor, old: Path, what: str) -> None:
    """The old client bundle's token embedding against the model's: equal, or (a bundle that stores it transformed)
    equal after the old key's residual transform."""
    arch = architecture_for(ck.config)
    names = {name for name, _ in ck.shapes() if arch.match(name).rule.client_name == "token"}
    tensors = ck.read(names) if hasattr(ck, "read") else {n: t for n, t in ck.tensors() if n in names}
    if len(tensors) != 1:
        return  # no single token table to compare: the config and shape checks above stand alone
    (table,) = tensors.values()
    if tuple(table.shape) == tuple(stored.shape) and torch.equal(table.to(stored.dtype), stored):
        return
    key = ClientKey.load(old / CLIENT_DIR / CLIENT_KEY_FILE)
    matrix = getattr(key, "residual_matrix", None)
    if matrix is not None and tuple(table.shape) == tuple(stored.shape):
        if torch.allclose(table.double() @ matrix(), stored.double(), atol=1e-5, rtol=1e-4):
            return
    raise KeyMismatchError(f"{what}: its token embedding differs from the one in {old / CLIENT_DIR} (another "
                           f"fine-tune, or other weights of the same shape)")


def rekey(model: str | Path, old: str | Path, out: str | Path, *, overwrite: bool = False, progress: bool = True,
          signing_key: str | Path | None = None, trusted: Trusted = None, seed: bytes | None = None) -> ProtectResult:
    """Protect `model` again into `out` with a fresh key and bundle id and the options of the protected folder `old`
    (mode, hardening; signed by `old`'s signing key unless `signing_key` is given). `model` must be the model `old`
    was protected from (KeyMismatchError otherwise). `seed`: for reproducible tests only."""
    old, out = Path(old), Path(out)
    if not old.is_dir():
        raise BundleError(f"{old} is not a folder: give the folder `stip protect --out` wrote")
    if out.absolute().resolve() == old.absolute().resolve():
        raise StipError(f"--out {out} is the old folder: rekey writes a new one, so that the old and the new context "
                        f"can be served side by side while clients move (docs/contexts.md)")
    options = old_options(old, trusted)
    if options["tee"]:  # its users hold no key: a rekeyed bundle without the enclave would hand them one
        raise StipError(f"{old} is a TEE deployment (it has {', '.join(options['tee'])}); stip rekey does "
                        f"not issue TEE bundles: protect the model again with `stip protect --tee`")
    ck = Checkpoint.open(model)
    check_same_model(ck, old, options)
    kwargs: dict = {"mode": options["mode"]}
    accepted = inspect.signature(protect).parameters
    for name in ("harden", "noise", "head"):
        if options[name] and options[name] != "server":  # the defaults need no option
            if name not in accepted:
                raise StipError(f"{old} was protected with --{name} {options[name]}, which this STIP's protect does "
                                f"not know: upgrade it")
            kwargs[name] = options[name]
    signer = signing_key or old / DEVELOPER_DIR / SIGNING_KEY_FILE
    return protect(model, out, overwrite=overwrite, progress=progress, seed=seed, signing_key=signer, **kwargs)
