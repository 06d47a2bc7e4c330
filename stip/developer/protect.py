"""`stip protect`: a Hugging Face model in; a server bundle, a client bundle and the developer's key out.

Streams: one input tensor is read, transformed by the rules of its architecture, and handed to a shard writer that
flushes every `max_shard_bytes`; everything is written into a hidden staging folder that is renamed into place only
when all three bundles and their manifests are complete.
"""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file
from tqdm import tqdm

import stip
from stip.common import signing
from stip.common.bundles.manifest import MANIFEST_NAME, read_manifest, write_manifest
from stip.common.files import staged_directory, write_json_atomic
from stip.common.keys import HARDEN_OPTIONS, DeveloperKey
from stip.common.layout import (CLIENT_CONFIG_FILE, CLIENT_DIR, CLIENT_KEY_FILE, CLIENT_MODULE_DIR, DEVELOPER_DIR,
                                DEVELOPER_KEY_FILE, EMBEDDING_FILE, MODEL_CONFIG_FILE, SERVER_DIR)
from stip.common.transforms import KeyRng
from stip.common.tasks import IMAGE_TEXT_TO_TEXT, ONE_SHOT_TASKS
from stip.common.architectures import (CLIENT, DROP, LM_HEAD, SERVER, TOKEN_EMBEDDING, Architecture, Placement,
                                       architecture_for, embedding_scale_of, geometry_of, task_of)
from stip.developer.checkpoint import Checkpoint
from stip.common.bundles.completeness import ROUND_TRIP, SERVER_DECODE, check_server_tensors
from stip.developer.fold import LINEAR, NormFolder
from stip.errors import KeyMismatchError, TensorSetError

DEFAULT_SHARD_BYTES = 512 * 1024**2
MODES = (ROUND_TRIP, SERVER_DECODE)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # copied into the client bundle

# Server-decode mode: the server also gets the client's tensors (transformed by their own rule's axes), and a
# tensor with one of these roles gets its rows permuted into this space too (the token embedding: rows in `pc`).
SERVER_DECODE_ROWS = {TOKEN_EMBEDDING: "vocab"}

# Server-decode mode: config / generation-config fields that hold token ids (remapped to server ids), besides every
# field named `*_token_id` or `*_token_ids`; and fields that hold ids in a form not remapped (refused if set).
ID_FIELDS = ("suppress_tokens", "begin_suppress_tokens", "bad_words_ids")
UNMAPPED_ID_FIELDS = ("forced_decoder_ids", "force_words_ids", "sequence_bias", "forced_bos_token_id_map")


def placements(arch: Architecture, name: str, tied: bool, mode: str = ROUND_TRIP) -> list[Placement]:
    """Where checkpoint tensor `name` goes in `mode`. Round-trip: the architecture's own placements. Server-decode:
    the server gets every tensor, the client none; client tensors go to the server under their canonical names,
    transformed by their rule's axes plus `SERVER_DECODE_ROWS`; a tied LM head stays tied (the embedding is it)."""
    if mode == ROUND_TRIP:
        return arch.placements(name, tied)
    if mode != SERVER_DECODE:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    m = arch.match(name)
    rule = m.rule
    if rule.party == DROP or (tied and rule.role == LM_HEAD):
        return []
    if rule.party == SERVER:
        return [Placement(SERVER, m.canonical, rule, m.layer, expert=m.expert, expert_at=m.expert_at)]
    axes = dict(rule.axes)
    if rule.role in SERVER_DECODE_ROWS:
        axes[0] = (SERVER_DECODE_ROWS[rule.role], "out")
    return [Placement(SERVER, m.canonical, replace(rule, axes=axes, party=SERVER), m.layer)]


def protect_tensor(arch: Architecture, key: DeveloperKey, name: str, tensor: torch.Tensor,
                   tied: bool, mode: str = ROUND_TRIP,
                   folder: NormFolder | None = None) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Yield (party, name, tensor) for one checkpoint tensor, following its architecture's rule.

    Client tensors (the embedding module) are passed on unchanged: the client applies `p` to them when it loads its
    bundle. A tied embedding also yields the server's LM head, transformed as the LM head's own rule says. In
    server-decode mode everything goes to the server (see `placements`). `folder` (--harden mix): norms folded into
    their consumers first; a hardened key's dense transforms are computed in float64 and rounded once.
    """
    dense = folder is not None or key.harden
    for p in placements(arch, name, tied, mode):
        if p.party == SERVER and not p.zeros and p.expert is None and dense:
            t = tensor.double()
            kind = LINEAR
            if folder is not None:
                kind, t = folder.fold(p.name, p.rule, t)
            if kind == LINEAR:
                t = _transform(p.rule.axes, key, p.layer, t)
            yield SERVER, p.name, t.to(tensor.dtype).contiguous()
            continue
        if p.party == CLIENT:
            yield CLIENT, p.name, tensor
        elif p.zeros:
            yield SERVER, p.name, torch.zeros_like(tensor)
        elif p.expert is not None:  # an MoE expert: its own FFN permutation, written under its secret slot
            slot = int(key.space("expert", p.layer).inverse_perm[p.expert])
            yield SERVER, p.name_in_slot(slot), _transform(p.rule.axes, key, p.layer, tensor, p.expert)
        else:
            yield SERVER, p.name, _transform(p.rule.axes, key, p.layer, tensor)


def check_checkpoint(ck: Checkpoint, arch: Architecture, tied: bool, mode: str = ROUND_TRIP) -> None:
    """Before anything is written: the server bundle this checkpoint makes (names and shapes, read from the
    checkpoint's headers) must be exactly what the server's model class loads, and the client must get the token
    embedding. Otherwise transformers would fill the gap with random weights on the server, silently."""
    outputs: dict[tuple[str, str], str] = {}  # (party, output name) -> checkpoint name
    server: dict[str, tuple[int, ...]] = {}
    has_token = False
    for name, shape in ck.shapes():
        rule = arch.match(name).rule  # the client embeds the input: a token table or a client-side module
        has_token |= rule.role == TOKEN_EMBEDDING or rule.client_module is not None
        for p in placements(arch, name, tied, mode):
            if (p.party, p.name) in outputs:
                raise TensorSetError(f"{ck.path}: tensors {outputs[p.party, p.name]!r} and {name!r} are the same "
                                     f"tensor ({p.name!r}) named twice")
            outputs[p.party, p.name] = name
            if p.party == SERVER:
                server[p.name] = shape
    if not has_token:
        raise TensorSetError(f"{ck.path} has no token embedding tensor (nor an input embeddings module)")
    check_server_tensors(_server_config(ck, mode), server, f"checkpoint {ck.path}",
                         {out: src for (party, out), src in outputs.items() if party == SERVER}, mode=mode)


def protect_state_dict(arch: Architecture, key: DeveloperKey, state: dict[str, torch.Tensor],
                       tied: bool, mode: str = ROUND_TRIP) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """In-memory protection of a whole state dict: (server tensors, client embedding tensors). For small models
    and tests; `protect` streams the same per-tensor function over files."""
    parts: dict[str, dict[str, torch.Tensor]] = {SERVER: {}, CLIENT: {}}
    folder = None
    if key.client.mixed:
        folder = NormFolder.build(arch, key.geometry.layers, state, lambda names: {n: state[n] for n in names})
    for name, tensor in state.items():
        for party, out_name, t in protect_tensor(arch, key, name, tensor, tied, mode, folder):
            parts[party][out_name] = t
    return parts[SERVER], parts[CLIENT]


def _transform(axes: dict, key: DeveloperKey, layer: int | None, t: torch.Tensor,
               expert: int | None = None) -> torch.Tensor:
    """Apply each axis's transform; `expert` (an original MoE expert index) selects that expert's own "ffn"."""
    for axis, (space, role) in axes.items():
        t = key.space(space, layer, expert if space == "ffn" else None).apply(t, axis, role)
    return t.contiguous()


class ShardWriter:
    """Buffers tensors and writes standard `model-XXXXX-of-YYYYY.safetensors` shards plus their index."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder, self.max_bytes = folder, max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffered + size > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor
        self.buffered += size
        self.total += size

    def flush(self) -> None:
        if not self.buffer:
            return
        save_file(self.buffer, str(self.folder / f"shard-{len(self.shards):05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.buffer))
        self.buffer, self.buffered = {}, 0

    def close(self) -> None:
        self.flush()
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f"shard-{i:05d}.tmp").rename(self.folder / final)
            weight_map |= {name: final for name in names}
        write_json_atomic(self.folder / "model.safetensors.index.json",
                          {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))})


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
            pcrs: dict[str, str] | None = None) -> ProtectResult:
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
    """
    if tee and mode != ROUND_TRIP:
        raise ValueError("--tee needs round-trip mode: the enclave holds the key and embeds for the clients")
    if (attestation != "simulated" or pcrs) and not tee:
        raise stip.errors.StipError("--attestation and PCRs pin the TEE client's verifier: they need --tee")
    if tee:
        from stip.developer.tee import check_attestation

        pcrs = check_attestation(attestation, pcrs)  # before the slow part
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
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
    geometry = geometry_of(ck.config)
    harden = resolve_harden(arch, ck.config.model_type, harden, noise, mode, tee)
    if isinstance(key, (str, Path)):
        key = _load_developer_key(Path(key))
    if key is not None and harden and tuple(key.harden) != harden:
        raise KeyMismatchError(f"the developer key was drawn with --harden {','.join(key.harden) or 'none'}, "
                               f"not {','.join(harden)}")
    new_signer = signing_key is None
    if isinstance(signing_key, (str, Path)):
        signing_key = signing.load_signing_key(signing_key)
    signing_key = signing_key or signing.generate_signing_key()
    if key is None:
        key = DeveloperKey.generate(geometry, uuid.uuid4().hex, KeyRng(seed), harden, keep_ones=arch.layer_norm)
    key.check_matches(geometry)
    harden = resolve_harden(arch, ck.config.model_type, key.harden, noise, mode, tee)  # a reused key's own modes
    bundle_id = key.client.bundle_id
    # tied: the checkpoint stores the LM head once, as the token embedding (a table without an LM head has no tie)
    tied = bool(getattr(ck.config, "tie_word_embeddings", False)) and any(r.role == LM_HEAD for r in arch.rules)
    check_checkpoint(ck, arch, tied, mode)
    tokenizer = ck.load_tokenizer()
    folder = NormFolder.build(arch, geometry.layers, [n for n, _ in ck.shapes()], ck.read) \
        if key.client.mixed else None

    with staged_directory(Path(out), overwrite=overwrite) as stage:
        server, client, developer = (stage / d for d in (SERVER_DIR, CLIENT_DIR, DEVELOPER_DIR))
        for d in (server, client, developer):
            d.mkdir()
        writer = ShardWriter(server, max_shard_bytes)
        module_writer = None  # the client-side module's shards, opened at its first tensor
        embedding: dict[str, tuple[int, ...]] = {}  # client tensor -> shape; written as soon as it is read
        bar = tqdm(total=ck.total_tensors(), unit="tensor", desc="protect", disable=not progress)
        for name, tensor in ck.tensors():
            rule = arch.match(name).rule
            if rule.party == CLIENT and rule.client_name is not None:
                embedding[rule.client_name] = tuple(tensor.shape)
            for party, out_name, t in protect_tensor(arch, key, name, tensor, tied, mode, folder):
                if party == SERVER:
                    writer.add(out_name, t)
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

        _write_server_config(ck, server, mode, key)
        client_fp = key.client.save(client / CLIENT_KEY_FILE)
        write_json_atomic(client / CLIENT_CONFIG_FILE,
                          {**_client_config(ck, embedding, bundle_id, mode), "harden": list(harden),
                           "noise": float(noise)})
        write_json_atomic(client / MODEL_CONFIG_FILE, ck.config.to_dict())
        if tokenizer is not None:
            tokenizer.save_pretrained(client)
        _copy_processor(ck, client)
        _copy_sentence_transformers(ck, client)
        developer_fp = key.save(developer / DEVELOPER_KEY_FILE)
        signing.save_signing_key(signing_key, developer / signing.SIGNING_KEY_FILE)

        _set_modes(stage, client, developer)
        common = {"stip_version": stip.__version__, "model_type": ck.config.model_type, "mode": mode,
                  "harden": list(harden), "noise": float(noise)}
        sign = {"signing_key": signing_key}
        write_manifest(server, "server", bundle_id, common, **sign)
        write_manifest(client, "client", bundle_id, {**common, "client_key_fingerprint": client_fp}, **sign)
        write_manifest(developer, "developer", bundle_id, {**common, "developer_key_fingerprint": developer_fp},
                       **sign)
        tee_info = None
        if tee:
            if task_of(ck.config) != "text-generation":
                raise stip.errors.UnsupportedModelError(f"{model}: --tee serves text generation; this is a "
                                                        f"{task_of(ck.config)} model")
            from stip.developer.tee import write_tee_bundles

            tee_info = write_tee_bundles(stage, bundle_id, signing_key, platform_key, attestation, pcrs)
            tee_info.pop("platform_key")
    return ProtectResult(Path(out), bundle_id, client_fp, developer_fp, writer.total,
                         signing.signer_info(signing_key), new_signer, tee_info, harden, float(noise))


class HardenOptionError(stip.errors.StipError, ValueError):
    """A bad --harden / --noise value or combination (the CLI prints it without a traceback)."""


def resolve_harden(arch: Architecture, model_type: str, harden, noise: float, mode: str,
                   tee: bool) -> tuple[str, ...]:
    """The hardening options asked for ("mix,rope", a list, or "all": every option the family supports), in
    canonical order; refuses options the family, the mode or TEE cannot carry, naming them."""
    asked = [o.strip() for o in (harden.split(",") if isinstance(harden, str) else harden) if o and o.strip()]
    if "all" in asked:
        asked = [o for o in asked if o != "all"] + list(arch.harden or ["all"])
    for o in asked:
        if o not in HARDEN_OPTIONS and o != "all":
            raise HardenOptionError(f"unknown hardening option {o!r}; choose from {', '.join(HARDEN_OPTIONS)} or all")
        if o not in arch.harden:
            why = " (its GELU admits no exact rescaling)" if o == "ffn" and arch.harden else ""
            raise stip.errors.UnsupportedModelError(
                f"{model_type} models do not support --harden {o}{why}; "
                + (f"{model_type} supports {', '.join(arch.harden)}" if arch.harden
                   else "hardened modes cover LLaMA-family (llama, mistral, qwen2) and GPT-2 models"))
    if not isinstance(noise, (int, float)) or not 0 <= float(noise) < 1:  # NaN fails too
        raise HardenOptionError(f"--noise must be a number in [0, 1), relative to the embedding table's RMS; "
                                f"got {noise!r}")
    if noise and not arch.harden:
        raise stip.errors.UnsupportedModelError(
            f"{model_type} models do not support --noise; it covers LLaMA-family (llama, mistral, qwen2) and GPT-2 "
            "models")
    if (asked or noise) and (mode != ROUND_TRIP or tee):
        what = "--tee" if tee else f"{mode} mode"
        raise HardenOptionError(f"--harden and --noise need round-trip mode without --tee (the client embeds); "
                                f"not {what}")
    return tuple(o for o in HARDEN_OPTIONS if o in asked)


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


def _write_server_config(ck: Checkpoint, folder: Path, mode: str = ROUND_TRIP, key: DeveloperKey | None = None) -> None:
    config = _server_config(ck, mode)
    gen = ck.generation_config()
    if mode == SERVER_DECODE:
        to_server = key.client.vocab.inverse_perm.tolist()
        _remap_ids(vars(config), to_server, "config.json")
        if gen is None:  # vLLM without a tokenizer reads EOS from generation_config.json: always write one
            gen = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                   "decoder_start_token_id") if getattr(config, k, None) is not None}
        else:
            gen = _remap_ids(dict(gen), to_server, "generation_config.json")
    config.save_pretrained(folder)
    if gen is not None:
        write_json_atomic(folder / "generation_config.json", gen)


def _is_id_field(name: str) -> bool:
    return name.endswith(("_token_id", "_token_ids")) or name in ID_FIELDS


def _remap_ids(fields: dict, to_server: list[int], where: str) -> dict:
    """Replace every token id in `fields` (in place; ints, lists, nested lists) by its server id. Ids outside the
    vocabulary (a -1 "none") stay as they are. Fields that hold ids in a form not remapped are refused."""
    def remap(v):
        if isinstance(v, bool) or v is None:
            return v
        if isinstance(v, int):
            return to_server[v] if 0 <= v < len(to_server) else v
        if isinstance(v, (list, tuple)):
            return [remap(x) for x in v]
        return v

    for name in list(fields):
        if name in UNMAPPED_ID_FIELDS and fields[name]:
            raise stip.errors.UnsupportedModelError(f"{where}: {name!r} holds token ids that server-decode mode does "
                                                    "not remap; remove it from the model's config to protect it")
        if _is_id_field(name):
            fields[name] = remap(fields[name])
    return fields


def _server_config(ck: Checkpoint, mode: str = ROUND_TRIP):
    """The model's own config. Round-trip: untied (the server has the LM head, the client the embedding).
    Server-decode: tied as the model is (the server has both); special ids are remapped by the caller. A model whose
    server runs only part of it (LLaVA: its language model) gets that part's config."""
    config = copy.deepcopy(_language_config(ck))
    if mode == ROUND_TRIP:
        config.tie_word_embeddings = False
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    if config.model_type == "gpt2":
        config.architectures = ["GPT2LMHeadModel"]
    arch = architecture_for(ck.config)
    if arch.server_class is not None:  # encoders and classifiers: the class the checkpoint names (BertModel, ...)
        config.architectures = [arch.server_class(ck.config)]
    return config


def _language_config(ck: Checkpoint):
    """The config of the model the server runs: the whole model's, or its language model's (LLaVA)."""
    arch = architecture_for(ck.config)
    return arch.server_config(ck.config) if arch.server_config else ck.config


def _copy_processor(ck: Checkpoint, client: Path) -> None:
    """The model's image processor and processor configs, which the client runs on images (ViT, LLaVA)."""
    for name in PROCESSOR_FILES:
        if (ck.path / name).is_file():
            (client / name).write_bytes((ck.path / name).read_bytes())


def _copy_sentence_transformers(ck: Checkpoint, client: Path) -> None:
    """A sentence-transformers model's pipeline description (modules.json and each module's small JSON configs:
    pooling, normalization), which the client follows to pool hidden states into sentence embeddings. Weights of
    extra modules (a Dense layer) are not copied: the client refuses such a pipeline by name."""
    if not (ck.path / "modules.json").is_file():
        return
    names = ["modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"]
    for module in json.loads((ck.path / "modules.json").read_text()):
        if module.get("path"):
            names += [f"{module['path']}/{f.name}" for f in (ck.path / module["path"]).glob("*.json")]
    for name in names:
        if (ck.path / name).is_file():
            (client / name).parent.mkdir(parents=True, exist_ok=True)
            (client / name).write_bytes((ck.path / name).read_bytes())


def _client_config(ck: Checkpoint, embedding: dict[str, tuple[int, ...]],
                   bundle_id: str, mode: str = ROUND_TRIP) -> dict:
    c = ck.config
    lm = _language_config(ck)
    eos = getattr(lm, "eos_token_id", None)
    gen = ck.generation_config() or {}
    eos = gen.get("eos_token_id", eos)
    return {
        "bundle_id": bundle_id,
        "mode": mode,
        "task": task_of(c),
        "model_type": c.model_type,
        "hidden_size": embedding["token"][1] if "token" in embedding else int(lm.hidden_size),
        "vocab_size": embedding["token"][0] if "token" in embedding else int(getattr(lm, "vocab_size", 0) or 0),
        "learned_positions": "position" in embedding and mode == ROUND_TRIP,
        "max_positions": embedding["position"][0] if "position" in embedding
        else int(getattr(lm, "max_position_embeddings", 0) or 0),
        "eos_token_ids": [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]),
        "bos_token_id": getattr(lm, "bos_token_id", None),
        "embedding_scale": embedding_scale_of(c),  # the model's own scale inside its embedding module (Gemma)
    }
