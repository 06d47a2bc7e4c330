"""`stip protect`: a Hugging Face model in; a server bundle, a client bundle and the developer's key out.

Streams: one input tensor is read, transformed by the rules of its architecture, and handed to a shard writer that
flushes every `max_shard_bytes`; everything is written into a hidden staging folder that is renamed into place only
when all three bundles and their manifests are complete. This module is the pipeline; its parts are the per-tensor
rules (protect_tensors), the shard writer (shards), the hardening options (harden_options) and the bundles' config
files (bundle_configs), whose public names it re-exports.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file
from tqdm import tqdm

import stip
from stip.common import signing
from stip.common.architectures import (CLIENT, LM_HEAD, SERVER, Architecture, architecture_for, geometry_of,
                                       task_of)
from stip.common.bundles.completeness import ROUND_TRIP, SERVER_DECODE
from stip.common.bundles.manifest import MANIFEST_NAME, read_manifest, write_manifest
from stip.common.files import staged_directory
from stip.common.keys import DeveloperKey
from stip.common.layout import (CLIENT_DIR, CLIENT_KEY_FILE, CLIENT_MODULE_DIR, DEVELOPER_DIR, DEVELOPER_KEY_FILE,
                                EMBEDDING_FILE, HEAD_FILE, HEAD_SERVER, SERVER_DIR)
from stip.common.tasks import IMAGE_TEXT_TO_TEXT, ONE_SHOT_TASKS
from stip.common.transforms import KeyRng
from stip.developer.bundle_configs import (ID_FIELDS, PROCESSOR_FILES, UNMAPPED_ID_FIELDS, write_client_configs,
                                           write_server_config)
from stip.developer.checkpoint import Checkpoint
from stip.developer.fold import NormFolder
from stip.developer.harden_options import HardenOptionError, check_head, resolve_harden
from stip.developer.protect_tensors import (HEAD, MODES, SERVER_DECODE_ROWS, check_checkpoint, placements,
                                            protect_state_dict, protect_tensor)
from stip.developer.shards import DEFAULT_SHARD_BYTES, ShardWriter
from stip.errors import KeyMismatchError

__all__ = ["DEFAULT_SHARD_BYTES", "HardenOptionError", "ID_FIELDS", "MODES", "PROCESSOR_FILES", "ProtectResult",
           "SERVER_DECODE_ROWS", "ShardWriter", "UNMAPPED_ID_FIELDS", "check_checkpoint", "placements", "protect",
           "protect_state_dict", "protect_tensor", "resolve_harden"]


@dataclass
class ProtectResult:
    out: Path
    bundle_id: str
    client_fingerprint: str
    developer_fingerprint: str
    server_bytes: int
    signer: dict  # signing.signer_info of the key that signed all three manifests
    new_signing_key: bool = True
    tee: dict | None = None  # --tee: {"measurement", "platform_pin", "attestation", "pcrs"} (stip.developer.tee)
    harden: tuple[str, ...] = ()  # the hardening options applied (docs/hardened.md)
    noise: float = 0.0
    head: str = HEAD_SERVER  # where the LM head is: "server", or "client" (--head client, docs/head-client.md)

    @property
    def server(self) -> Path:
        return self.out / SERVER_DIR

    @property
    def client(self) -> Path:
        return self.out / CLIENT_DIR

    @property
    def developer_key(self) -> Path:
        return self.out / DEVELOPER_DIR / DEVELOPER_KEY_FILE

    @property
    def signing_key(self) -> Path:
        return self.out / DEVELOPER_DIR / signing.SIGNING_KEY_FILE


def protect(model: str | Path, out: str | Path, *, key: str | Path | DeveloperKey | None = None,
            overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True,
            seed: bytes | None = None,
            signing_key: str | Path | signing.Ed25519PrivateKey | None = None,
            mode: str = ROUND_TRIP, tee: bool = False, platform_key: str | Path | None = None,
            harden: str | tuple[str, ...] | list[str] = (), noise: float = 0.0, attestation: str = "simulated",
            pcrs: dict[str, str] | None = None, head: str = HEAD_SERVER) -> ProtectResult:
    """Protect `model` (HF folder or .gguf file) into `out/{server,client,developer}`.

    `mode`: "round-trip" (the server gets no embedding table; clients embed and sample) or "server-decode" (the
    server bundle is a complete standard checkpoint in the permuted vocabulary that samples by itself; the client
    bundle holds the key and the tokenizer, and maps ids both ways). See docs/server-decode.md.

    `key`: reuse a developer key (it must match the model's shapes); by default a fresh one is drawn from the CSPRNG.
    `seed`: 32 bytes seeding the CSPRNG instead of os.urandom, for reproducible tests only.
    `signing_key`: the developer's Ed25519 key (a `signing.key` file) that signs every manifest; reuse one so users
    pin it once. By default a fresh one is generated. Either way a copy goes to `developer/signing.key`.
    `tee`: also write `out/enclave/` (sealed for the platform in `platform_key`) and the key-less `out/tee-client/`
    (stip.developer.tee, docs/tee.md); text-generation models in round-trip mode. `attestation`: the report the TEE
    client accepts, "simulated" or "nitro" (AWS Nitro Enclaves; `pcrs` from `stip.developer.tee.nitro_pcrs`).
    `harden`: hardened modes (docs/hardened.md), options of "mix", "rope", "vo", "ffn", or "all" (every option the
    family supports); `noise`: the client adds Gaussian noise of `noise` times the embedding table's RMS to every
    embedding row it sends (lossy). Both: LLaMA-family and GPT-2 models, round-trip mode; off by default.
    `head`: "client" keeps the LM head out of the server bundle; the client bundle holds it (float16) and the server
    returns the final hidden state (docs/head-client.md). Causal LMs in round-trip mode without `tee`, any harden.
    """
    pcrs = _check_mode_and_tee(mode, tee, attestation, pcrs)
    ck, arch = _open_checkpoint(model, mode)
    head = check_head(head, mode, tee, task_of(ck.config))
    geometry = geometry_of(ck.config)
    harden = resolve_harden(arch, ck.config.model_type, harden, noise, mode, tee)
    key = _reused_key(key, harden)
    new_signer = signing_key is None
    if isinstance(signing_key, (str, Path)):
        signing_key = signing.load_signing_key(signing_key)
    signing_key = signing_key or signing.generate_signing_key()
    if key is None:
        key = DeveloperKey.generate(geometry, uuid.uuid4().hex, KeyRng(seed), harden, keep_ones=arch.layer_norm)
    key.check_matches(geometry)
    harden = resolve_harden(arch, ck.config.model_type, key.harden, noise, mode, tee)  # a reused key's own modes
    bundle_id = key.client.bundle_id
    tied = _is_tied(ck, arch)
    check_checkpoint(ck, arch, tied, mode, head)
    tokenizer = ck.load_tokenizer()
    folder = NormFolder.build(arch, geometry.layers, [n for n, _ in ck.shapes()], ck.read) \
        if key.client.mixed else None
    plan = _Plan(ck, arch, key, mode, tied, folder, head)

    with staged_directory(Path(out), overwrite=overwrite) as stage:
        server, client, developer = (stage / d for d in (SERVER_DIR, CLIENT_DIR, DEVELOPER_DIR))
        for d in (server, client, developer):
            d.mkdir()
        server_bytes, embedding = _write_tensors(model, plan, server, client, max_shard_bytes, progress)
        write_server_config(ck, server, mode, key, head)
        client_fp = key.client.save(client / CLIENT_KEY_FILE)
        write_client_configs(ck, client, embedding, bundle_id, mode, harden, noise, tokenizer, head)
        developer_fp = key.save(developer / DEVELOPER_KEY_FILE)
        signing.save_signing_key(signing_key, developer / signing.SIGNING_KEY_FILE)
        _set_modes(stage, client, developer)
        common = {"stip_version": stip.__version__, "model_type": ck.config.model_type, "mode": mode,
                  "harden": list(harden), "noise": float(noise), "head": head}
        _write_manifests(stage, bundle_id, common, signing_key, client_fp, developer_fp)
        tee_info = _write_tee(model, ck, stage, bundle_id, signing_key, platform_key, attestation, pcrs) \
            if tee else None
    return ProtectResult(Path(out), bundle_id, client_fp, developer_fp, server_bytes,
                         signing.signer_info(signing_key), new_signer, tee_info, harden, float(noise), head)


def _check_mode_and_tee(mode: str, tee: bool, attestation: str, pcrs: dict[str, str] | None) -> dict | None:
    """Option combinations refused before the checkpoint is opened; the TEE client's PCRs, checked."""
    if tee and mode != ROUND_TRIP:
        raise ValueError("--tee needs round-trip mode: the enclave holds the key and embeds for the clients")
    if (attestation != "simulated" or pcrs) and not tee:
        raise stip.errors.StipError("--attestation and PCRs pin the TEE client's verifier: they need --tee")
    if tee:
        from stip.developer.tee import check_attestation

        pcrs = check_attestation(attestation, pcrs)  # before the slow part
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    return pcrs


def _open_checkpoint(model: str | Path, mode: str) -> tuple[Checkpoint, Architecture]:
    """The checkpoint and its architecture's rules; server-decode refuses models that are not token generators."""
    ck = Checkpoint.open(model)
    arch = architecture_for(ck.config)
    if mode == SERVER_DECODE and task_of(ck.config) == IMAGE_TEXT_TO_TEXT:
        raise stip.errors.UnsupportedModelError(
            f"{model}: server-decode mode takes token ids only, so it cannot carry the client's image features; "
            "protect this vision-language model in round-trip mode")
    if mode == SERVER_DECODE and task_of(ck.config) in ONE_SHOT_TASKS:
        raise stip.errors.UnsupportedModelError(
            f"{model}: server-decode mode generates tokens, but this is a {task_of(ck.config)} model, served one "
            "request at a time; protect it in round-trip mode (the default)")
    return ck, arch


def _reused_key(key: str | Path | DeveloperKey | None, harden: tuple[str, ...]) -> DeveloperKey | None:
    """The developer key to reuse (loaded from its file), which must have been drawn with the options asked for."""
    if isinstance(key, (str, Path)):
        key = _load_developer_key(Path(key))
    if key is not None and harden and tuple(key.harden) != harden:
        raise KeyMismatchError(f"the developer key was drawn with --harden {','.join(key.harden) or 'none'}, "
                               f"not {','.join(harden)}")
    return key


@dataclass
class _Plan:
    """How each checkpoint tensor is protected, settled (and checked by check_checkpoint) before anything is
    written."""
    ck: Checkpoint
    arch: Architecture
    key: DeveloperKey
    mode: str
    tied: bool  # the checkpoint stores the LM head once, as the token embedding
    folder: NormFolder | None  # --harden mix: the norms folded into their consumers
    head: str = HEAD_SERVER  # --head client: the LM head goes to the client bundle (HEAD_FILE), not the server's


def _is_tied(ck: Checkpoint, arch: Architecture) -> bool:
    """Whether the checkpoint stores the LM head once, as the token embedding (a table without an LM head has no
    tie)."""
    return bool(getattr(ck.config, "tie_word_embeddings", False)) and any(r.role == LM_HEAD for r in arch.rules)


def _write_tensors(model: str | Path, plan: _Plan, server: Path, client: Path, max_shard_bytes: int,
                   progress: bool) -> tuple[int, dict[str, tuple[int, ...]]]:
    """Stream every checkpoint tensor through its rule into the bundles: the server's shards, the client-side
    module's shards, or one embedding file each. Returns the server's bytes and the client tensors' shapes."""
    writer = ShardWriter(server, max_shard_bytes)
    module_writer = None  # the client-side module's shards, opened at its first tensor
    embedding: dict[str, tuple[int, ...]] = {}  # client tensor -> shape; written as soon as it is read
    bar = tqdm(total=plan.ck.total_tensors(), unit="tensor", desc="protect", disable=not progress)
    for name, tensor in plan.ck.tensors():
        rule = plan.arch.match(name).rule
        if rule.party == CLIENT and rule.client_name is not None:
            embedding[rule.client_name] = tuple(tensor.shape)
        for party, out_name, t in protect_tensor(plan.arch, plan.key, name, tensor, plan.tied, plan.mode,
                                                 plan.folder, plan.head):
            if party == SERVER:
                writer.add(out_name, t)
            elif party == HEAD:
                _write_head(client, t)
            elif rule.client_module is not None:
                if module_writer is None:
                    (client / CLIENT_MODULE_DIR).mkdir()
                    module_writer = ShardWriter(client / CLIENT_MODULE_DIR, max_shard_bytes)
                module_writer.add(out_name, t.contiguous())
            else:
                save_file({"weight": t.contiguous()}, str(client / EMBEDDING_FILE.format(out_name)))
        bar.update(1)
    bar.close()
    writer.close()
    if module_writer is not None:
        module_writer.close()
    if "token" not in embedding and module_writer is None:
        raise stip.errors.UnsupportedModelError(f"{model} has no token embedding tensor")
    return writer.total, embedding


def _write_head(client: Path, head) -> None:
    """--head client: the protected LM head (float16, [V, d], rows in the server's vocabulary order) as one
    safetensors file, which the client memory-maps (stip.client.head)."""
    if not bool(head.isfinite().all()):
        raise stip.errors.UnsupportedModelError("--head client: the LM head overflows float16 (a weight beyond "
                                                "65504); this model cannot keep its head on the client in float16")
    save_file({"weight": head.contiguous()}, str(client / HEAD_FILE))


def _write_manifests(stage: Path, bundle_id: str, common: dict, signing_key: signing.Ed25519PrivateKey,
                     client_fp: str, developer_fp: str) -> None:
    """The three bundles' manifests, all signed by the developer's signing key."""
    sign = {"signing_key": signing_key}
    write_manifest(stage / SERVER_DIR, "server", bundle_id, common, **sign)
    write_manifest(stage / CLIENT_DIR, "client", bundle_id, {**common, "client_key_fingerprint": client_fp}, **sign)
    write_manifest(stage / DEVELOPER_DIR, "developer", bundle_id,
                   {**common, "developer_key_fingerprint": developer_fp}, **sign)


def _write_tee(model: str | Path, ck: Checkpoint, stage: Path, bundle_id: str,
               signing_key: signing.Ed25519PrivateKey, platform_key: str | Path | None, attestation: str,
               pcrs: dict | None) -> dict:
    """--tee: the enclave and TEE-client bundles (stip.developer.tee); text-generation models only."""
    if task_of(ck.config) != "text-generation":
        raise stip.errors.UnsupportedModelError(f"{model}: --tee serves text generation; this is a "
                                                f"{task_of(ck.config)} model")
    from stip.developer.tee import write_tee_bundles

    tee_info = write_tee_bundles(stage, bundle_id, signing_key, platform_key, attestation, pcrs)
    tee_info.pop("platform_key")
    return tee_info


def _load_developer_key(path: Path) -> DeveloperKey:
    """A developer key file; inside a developer bundle it must also be the key that bundle's manifest names."""
    key = DeveloperKey.load(path)
    if (path.parent / MANIFEST_NAME).is_file():
        manifest = read_manifest(path.parent, role="developer", verify=False, trusted=[], warn_unpinned=False)
        expected = manifest.get("developer_key_fingerprint")
        if expected and expected != key.fingerprint:
            raise KeyMismatchError(f"developer key {path} has fingerprint {key.fingerprint}, but the signed "
                                   f"manifest beside it names {expected}: the key file was swapped")
    return key


def _set_modes(stage: Path, client: Path, developer: Path) -> None:
    """Bundles are shareable (0644, folders 0755); keys and the developer folder are owner-only."""
    developer.chmod(0o700)
    secret = {client / CLIENT_KEY_FILE, developer / DEVELOPER_KEY_FILE, developer / signing.SIGNING_KEY_FILE}
    for p in [stage, *stage.rglob("*")]:
        if p.is_dir() and p != developer:
            p.chmod(0o755)
        elif p.is_file():
            p.chmod(0o600 if p in secret else 0o644)
