"""`stip protect --tee`: the TEE worker bundle, the enclave bundle (sealed) and the key-less TEE client bundle.

`DIR/server/` becomes the TEE WORKER bundle (manifest mode "tee-worker", re-signed): the standard server bundle
except block 0, whose norm weights are ones (biases zeros: the norms run in the enclave) and whose offloaded linears
are stored in secret bases, `W' = B W A^-1` (`B b` for biases), with `A` a secret monomial map (a permutation times
signs and powers of two) per input group (q/k/v share one, gate/up share one; o and down their own; GPT-2: c_attn,
attn.c_proj, c_fc, mlp.c_proj) and `B` one per linear's output; and, for a TIED model, the LM head (the embedding
table in `pc` and `p`) is zeros: the enclave computes the logits itself. An untied LM head stays, as `W A^-1`. So the
worker holds neither block 0 in the basis of `h1 p` nor the embedding in any form (docs/tee.md, "Why the worker's
copy of block 0 is in secret bases"). `stip serve` refuses this bundle without `--tee-worker`, and `--tee-worker`
refuses any other.

`DIR/enclave/`: `enclave.sealed` (what stip.enclave.compute needs: `p`, `pc`, the embedding table, GPT-2's positions,
the PERMUTED block-0 weights in the standard basis, the final norm, the LM head and the masks `A`, `B`; sealed under
HKDF(platform sealing secret, enclave code measurement)), the model's config and `stip_enclave.json`, with a signed
manifest. `DIR/tee-client/`: the tokenizer, the model's config and `stip_client.json` (mode "tee", the enclave's
expected measurement, the report format and what to verify it against: for simulated reports the platform key, for
AWS Nitro (`--attestation nitro`) the PCRs of the enclave image (`nitro_pcrs`); the enclave URL is given at run time);
NO key and NO embedding. The simulated platform's key file is created at
`DIR/tee-platform/platform.key` unless one is given: it stands for the TEE host's hardware, so it belongs on the
enclave host only.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from stip.common import signing
from stip.common.bundles.manifest import read_manifest, write_manifest
from stip.common.files import write_json_atomic
from stip.common.layout import CLIENT_CONFIG_FILE, CLIENT_DIR, MODEL_CONFIG_FILE, SERVER_DIR
from stip.common.tee.layout import (ENCLAVE_CONFIG_FILE, ENCLAVE_DIR, LM_HEAD, LM_HEAD_FIELD, LM_HEAD_IN_ENCLAVE,
                                    LM_HEAD_PREFIX, MASK_PREFIX, PLATFORM_FILE, SEALED_FILE, TEE_CLIENT_DIR,
                                    TEE_MODE, TEE_PLATFORM_DIR, TEE_WORKER_MODE)
from stip.errors import BundleError, StipError
# what block 0's tensors that are not offloaded linears (its norms) become in the worker bundle: rules as data
NEUTRAL = (("weight", 1.0), ("", 0.0))  # (name suffix, value), first match wins
# from the round-trip client config into both TEE bundles' configs: nothing secret, what sampling and limits need
CLIENT_FIELDS = ("task", "model_type", "vocab_size", "max_positions", "eos_token_ids", "bos_token_id", "hidden_size")
# --attestation -> the report format the TEE client config names (stip.client.tee, stip.client.nitro)
ATTESTATION_FORMATS = {"simulated": "stip-simulated-v1", "nitro": "aws-nitro-v1"}
NITRO_PCRS = (0, 1, 2, 3, 4, 8)  # image, kernel and boot, application, parent's IAM role, parent instance, signer
NITRO_PCR_HEX = 96  # SHA-384


def nitro_pcrs(flags: dict | None = None, pcrs_file: str | Path | None = None) -> dict[str, str]:
    """The PCRs a TEE client pins for `--attestation nitro`, {"0": hex, ...}: from `--pcrN HEX` flags ({N: HEX})
    and/or a pinning file, either what `nitro-cli build-enclave` prints ({"Measurements": {"HashAlgorithm":
    "Sha384 ...", "PCR0": HEX, ...}}) or {"PCR0": HEX, ...}. PCR0 (the image) is required; every value is SHA-384
    hex; a PCR given twice must agree. A StipError names what is wrong."""
    given: dict[int, tuple[str, str]] = {}  # index -> (hex, where it came from)
    for index, value in (flags or {}).items():
        if value is not None:
            given[int(index)] = (_pcr_hex(value, f"--pcr{index}"), f"--pcr{index}")
    if pcrs_file is not None:
        for index, value in _read_pcr_file(Path(pcrs_file)).items():
            old = given.get(index)
            if old and old[0] != value:
                raise StipError(f"PCR{index} is given twice with different values ({old[1]} and {pcrs_file})")
            given.setdefault(index, (value, str(pcrs_file)))
    if 0 not in given:
        raise StipError("--attestation nitro needs PCR0, the enclave image's hash (--pcr0 HEX or --pcrs FILE from "
                        "`nitro-cli build-enclave`): without it any image could claim the measurement")
    if not int(given[0][0], 16):
        raise StipError("PCR0 is all zeros: that is a debug-mode enclave, whose memory the host can read")
    return {str(i): given[i][0] for i in sorted(given)}


def check_attestation(attestation: str, pcrs: dict | None) -> dict[str, str] | None:
    """`attestation` is known and has what it pins: the PCRs (normalized by `nitro_pcrs`) for "nitro", none else."""
    if attestation not in ATTESTATION_FORMATS:
        raise StipError(f"unknown attestation {attestation!r}; choose one of {', '.join(ATTESTATION_FORMATS)}")
    if attestation != "nitro":
        if pcrs:
            raise StipError("PCRs are pinned only with --attestation nitro")
        return None
    return nitro_pcrs(pcrs)


def _pcr_hex(value, where: str) -> str:
    text = value.strip().lower() if isinstance(value, str) else ""
    if len(text) != NITRO_PCR_HEX or any(c not in "0123456789abcdef" for c in text):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise StipError(f"{where} must be a SHA-384 value, {NITRO_PCR_HEX} hex digits (as `nitro-cli build-enclave` "
                        f"prints it); got {shown} ({len(text) if isinstance(value, str) else 'not text'})")
    return text


def _read_pcr_file(path: Path) -> dict[int, str]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise StipError(f"PCR file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StipError(f"PCR file {path} is not readable JSON: {e}") from None
    data = data.get("Measurements", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise StipError(f'PCR file {path} must be a JSON object {{"PCR0": HEX, ...}} or nitro-cli\'s output')
    algorithm = str(data.get("HashAlgorithm", "Sha384"))
    if not algorithm.lower().startswith("sha384"):
        raise StipError(f"PCR file {path}: HashAlgorithm {algorithm!r}; Nitro PCRs are SHA-384")
    out = {}
    for name, value in data.items():
        if name == "HashAlgorithm":
            continue
        index = name[3:] if isinstance(name, str) and name.upper().startswith("PCR") else name
        if not str(index).isdigit() or int(index) not in NITRO_PCRS:
            raise StipError(f"PCR file {path}: {name!r} is not a Nitro PCR (PCR0-4 or PCR8)")
        out[int(index)] = _pcr_hex(value, f"{path}: {name}")
    return out


def write_tee_bundles(out: Path, bundle_id: str, signing_key, platform_key: Path | None = None,
                      attestation: str = "simulated", pcrs: dict[str, str] | None = None) -> dict:
    """Write `out/enclave/` and `out/tee-client/` from the finished server and client bundles in `out`; returns
    {"measurement", "platform_key", "platform_pin", "attestation", "pcrs"}. `attestation`: the report format the
    TEE client accepts, "simulated" (it pins the platform key) or "nitro" (it pins `pcrs`, from `nitro_pcrs`)."""
    pcrs = check_attestation(attestation, pcrs)
    from stip.common.tee.measurement import code_measurement, measurement
    from stip.common.tee.platform import SimulatedPlatform
    from stip.common.tee.sealing import seal_tensors, sealing_key
    from stip.developer.enclave_tensors import enclave_tensors_from_bundles

    out = Path(out)
    platform_path = Path(platform_key) if platform_key else out / TEE_PLATFORM_DIR / PLATFORM_FILE
    platform = SimulatedPlatform.load_or_create(platform_path)
    if not platform_key:
        platform_path.parent.chmod(0o700)
    trusted = [signing.pin(signing.signer_info(signing_key))]
    config, tensors = enclave_tensors_from_bundles(out, trusted=trusted)
    client_config = json.loads((out / CLIENT_DIR / CLIENT_CONFIG_FILE).read_text())
    original = json.loads((out / CLIENT_DIR / MODEL_CONFIG_FILE).read_text())  # the model's own config: tied?
    tensors.update(write_worker_bundle(out / SERVER_DIR, config, bool(original.get("tie_word_embeddings")),
                                       signing_key, trusted))
    shared = {k: client_config.get(k) for k in CLIENT_FIELDS}
    common = {"model_type": client_config.get("model_type"), "mode": TEE_MODE}

    enclave = out / ENCLAVE_DIR
    enclave.mkdir()
    code = code_measurement()
    seal_tensors(enclave / SEALED_FILE, tensors, sealing_key(platform.sealing_secret, code), bundle_id=bundle_id,
                 code_measurement=code)
    write_json_atomic(enclave / MODEL_CONFIG_FILE, config)
    write_json_atomic(enclave / ENCLAVE_CONFIG_FILE, {"bundle_id": bundle_id, **shared})
    write_manifest(enclave, "enclave", bundle_id, common, signing_key=signing_key)
    expected = measurement(enclave)

    client = out / TEE_CLIENT_DIR
    client.mkdir()
    for f in (out / CLIENT_DIR).iterdir():  # the tokenizer files, nothing else of the round-trip client bundle
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens"))
                            or f.name in ("chat_template.jinja", "chat_template.json")):
            (client / f.name).write_bytes(f.read_bytes())
    write_json_atomic(client / MODEL_CONFIG_FILE, config)
    pins = {"nitro": {"pcrs": dict(pcrs)}} if attestation == "nitro" else {"platform_key": platform.pin()}
    write_json_atomic(client / CLIENT_CONFIG_FILE, {
        "bundle_id": bundle_id, "mode": TEE_MODE, **shared,
        "tee": {"measurement": expected, "format": ATTESTATION_FORMATS[attestation], **pins, "enclave_url": None}})
    write_manifest(client, "tee-client", bundle_id, common, signing_key=signing_key)
    for p in (enclave, client, *enclave.rglob("*"), *client.rglob("*")):
        p.chmod(0o755 if p.is_dir() else (0o600 if p.name == SEALED_FILE else 0o644))
    return {"measurement": expected, "platform_key": platform_path, "platform_pin": platform.pin(),
            "attestation": attestation, "pcrs": dict(pcrs or {})}


# ------------------------------------------------------------------ the TEE worker bundle (DIR/server)

def draw_masks(config, tied: bool, rng=None) -> dict:
    """The worker's secret bases from a CSPRNG: {linear name: (A, B)} for block 0 (one A per input group, shared by
    its members) and, for an untied model, {"lm_head": (A, None)}."""
    from stip.common.transforms import KeyRng
    from stip.common.tee.blocks import block0_layout, input_groups
    from stip.common.tee.linalg import Monomial, weight_of

    rng = rng or KeyRng()
    _, block = block0_layout(config)
    masks = {}
    for group in input_groups(block):
        weights = [weight_of(block.get_submodule(n))[0] for n in group]
        a = Monomial.draw(int(weights[0].shape[1]), rng)
        masks.update({n: (a, Monomial.draw(int(w.shape[0]), rng)) for n, w in zip(group, weights)})
    if not tied:
        hidden = int(getattr(config, "hidden_size", 0) or config.n_embd)
        masks[LM_HEAD] = (Monomial.draw(hidden, rng), None)
    return masks


def mask_tensors(masks: dict, tied: bool) -> dict:
    """The masks as enclave tensors (stip.enclave.compute reads them), and whether the LM head is the enclave's."""
    import torch

    out = {LM_HEAD_IN_ENCLAVE: torch.tensor(int(tied))}
    for name, (a, b) in masks.items():
        out.update(a.tensors(f"{MASK_PREFIX}{name}.in"))
        if b is not None:
            out.update(b.tensors(f"{MASK_PREFIX}{name}.out"))
    return out


def write_worker_bundle(server: Path, config: dict, tied: bool, signing_key, trusted=None, rng=None) -> dict:
    """Turn the standard server bundle in `server` into the TEE worker bundle (module docstring), shard by shard
    (each written beside the old one, then renamed over it: a hard-linked copy keeps its own file), and re-sign
    its manifest; returns the mask tensors for the enclave bundle."""
    from stip.common.tee.blocks import config_of

    server = Path(server)
    manifest = read_manifest(server, role="server", trusted=trusted)
    if manifest.get("mode") == TEE_WORKER_MODE:
        raise BundleError(f"{server} is already a TEE worker bundle")
    config = config_of(config)
    masks = draw_masks(config, tied, rng)
    replace = _worker_tensor_rule(config, masks, tied)
    for shard in sorted(f for f in manifest["files"] if f.endswith(".safetensors")):
        _rewrite_shard(server / shard, replace)
    extra = {k: v for k, v in manifest.items()
             if k not in ("format", "version", "role", "bundle_id", "files", signing.SIGNER_FIELD,
                          signing.SIGNATURE_FIELD)}
    extra.update({"mode": TEE_WORKER_MODE, LM_HEAD_FIELD: "enclave" if tied else "worker"})
    write_manifest(server, "server", manifest["bundle_id"], extra, signing_key=signing_key)
    return mask_tensors(masks, tied)


def _worker_tensor_rule(config, masks: dict, tied: bool):
    """name, tensor -> the worker bundle's tensor, or None to keep it as it is."""
    import torch

    from stip.common.tee.blocks import block0_layout
    from stip.common.tee.linalg import is_conv1d, masked_weight

    prefix, block = block0_layout(config)
    linears = {n: is_conv1d(block.get_submodule(n)) for n in masks if n != LM_HEAD}

    def exact(name: str, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = value.to(like.dtype)
        if not torch.equal(out.to(value.dtype), value):  # e.g. a float16 value scaled into the subnormals
            raise ValueError(f"TEE worker bundle: {name} does not keep its values in {like.dtype} once masked")
        return out.contiguous()

    def rule(name: str, t: torch.Tensor):
        if name.startswith(LM_HEAD_PREFIX):
            if tied:
                return torch.zeros_like(t)
            if name == LM_HEAD_PREFIX + "weight":
                return exact(name, masked_weight(t, masks[LM_HEAD][0], None), t)
            raise ValueError(f"TEE mode: no rule for the LM head's tensor {name!r}")
        if not name.startswith(prefix):
            return None
        rest = name[len(prefix):]
        linear, _, param = rest.rpartition(".")
        if linear in linears:
            a, b = masks[linear]
            if param == "bias":
                return exact(name, t.double()[b.perm] * b.scale, t)
            w = t.t() if linears[linear] else t
            w = masked_weight(w, a, b)
            return exact(name, w.t() if linears[linear] else w, t)
        value = next(v for suffix, v in NEUTRAL if rest.endswith(suffix))
        return torch.full_like(t, value)

    return rule


def _rewrite_shard(path: Path, rule) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        metadata, names = f.metadata(), list(f.keys())
        tensors, changed = {}, False
        for n in names:
            t = f.get_tensor(n)
            new = rule(n, t)
            changed |= new is not None
            tensors[n] = t if new is None else new
    if not changed:
        return
    tmp = path.with_name(f".{path.name}.tee.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_enclave_tensors(out: str | Path, platform_key: str | Path | None = None) -> tuple[dict, dict]:
    """(model config, tensors) of a `stip protect --tee` folder's sealed enclave bundle, unsealed with the
    (simulated) platform key: what `stip enclave` loads; for tests and benchmarks that run the enclave in process."""
    from stip.common.tee.measurement import code_measurement
    from stip.common.tee.platform import SimulatedPlatform
    from stip.common.tee.sealing import sealing_key, unseal_tensors

    out = Path(out)
    platform = SimulatedPlatform.load(Path(platform_key) if platform_key else out / TEE_PLATFORM_DIR / PLATFORM_FILE)
    _, tensors = unseal_tensors(out / ENCLAVE_DIR / SEALED_FILE, sealing_key(platform.sealing_secret,
                                                                             code_measurement()))
    return json.loads((out / ENCLAVE_DIR / MODEL_CONFIG_FILE).read_text()), tensors
