"""`stip protect --tee`: the enclave bundle (sealed) and the key-less TEE client bundle, beside the usual three.

`DIR/enclave/`: `enclave.sealed` (what stip.enclave.compute needs: `p`, `pc`, the embedding table, GPT-2's positions,
the PERMUTED block-0 weights, the final norm and the LM head; sealed under HKDF(platform sealing secret, enclave code
measurement)), the model's config and `stip_enclave.json`, with a signed manifest. `DIR/tee-client/`: the tokenizer,
the model's config and `stip_client.json` (mode "tee", the enclave's expected measurement, the report format, and for
simulated reports the platform key to pin; the enclave URL is given at run time); NO key and NO embedding. The server
bundle is unchanged. The simulated platform's key file is created at `DIR/tee-platform/platform.key` unless one is
given: it stands for the TEE host's hardware, so it belongs on the enclave host only.
"""

from __future__ import annotations

import json
from pathlib import Path

from stip.common import signing
from stip.common.files import write_json_atomic, write_manifest
from stip.common.layout import CLIENT_CONFIG_FILE, CLIENT_DIR, MODEL_CONFIG_FILE

ENCLAVE_DIR, TEE_CLIENT_DIR, TEE_PLATFORM_DIR = "enclave", "tee-client", "tee-platform"
SEALED_FILE, ENCLAVE_CONFIG_FILE = "enclave.sealed", "stip_enclave.json"
PLATFORM_FILE = "platform.key"
TEE_MODE = "tee"
# from the round-trip client config into both TEE bundles' configs: nothing secret, what sampling and limits need
CLIENT_FIELDS = ("task", "model_type", "vocab_size", "max_positions", "eos_token_ids", "bos_token_id", "hidden_size")


def write_tee_bundles(out: Path, bundle_id: str, signing_key, platform_key: Path | None = None) -> dict:
    """Write `out/enclave/` and `out/tee-client/` from the finished server and client bundles in `out`; returns
    {"measurement", "platform_key", "platform_pin"}."""
    from stip.enclave.attestation import SimulatedPlatform, code_measurement, measurement
    from stip.enclave.compute import enclave_tensors_from_bundles
    from stip.enclave.sealing import seal_tensors, sealing_key

    out = Path(out)
    platform_path = Path(platform_key) if platform_key else out / TEE_PLATFORM_DIR / PLATFORM_FILE
    platform = SimulatedPlatform.load_or_create(platform_path)
    if not platform_key:
        platform_path.parent.chmod(0o700)
    trusted = [signing.pin(signing.signer_info(signing_key))]
    config, tensors = enclave_tensors_from_bundles(out, trusted=trusted)
    client_config = json.loads((out / CLIENT_DIR / CLIENT_CONFIG_FILE).read_text())
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
    write_json_atomic(client / CLIENT_CONFIG_FILE, {
        "bundle_id": bundle_id, "mode": TEE_MODE, **shared,
        "tee": {"measurement": expected, "format": "stip-simulated-v1", "platform_key": platform.pin(),
                "enclave_url": None}})
    write_manifest(client, "tee-client", bundle_id, common, signing_key=signing_key)
    for p in (enclave, client, *enclave.rglob("*"), *client.rglob("*")):
        p.chmod(0o755 if p.is_dir() else (0o600 if p.name == SEALED_FILE else 0o644))
    return {"measurement": expected, "platform_key": platform_path, "platform_pin": platform.pin()}
