"""Bad input to the developer's tools: a clear error naming the problem, a non-zero exit code, and nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ElectraConfig, ElectraForMaskedLM

from stip.client.bundle import ClientBundle
from stip.common import signing
from stip.errors import BundleError, KeyMismatchError
from stip.server.model import load_protected_model
from tests.models import save_tiny


def stip_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "stip.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def assert_fails(result, *words):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for w in words:
        assert w in result.stderr, result.stderr


def assert_nothing_written(parent, name):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], "partial output left behind"


@pytest.fixture()
def bundle(tiny_protected, tmp_path):
    """A private copy of a protected tiny model that the test may damage."""
    _, out = tiny_protected("llama-gqa-untied")
    shutil.copytree(out, tmp_path / "protected")
    return tmp_path / "protected"


def test_tampered_shard_is_refused(bundle):
    shard = next((bundle / "server").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01
    shard.write_bytes(bytes(data))
    assert_fails(stip_cli("verify", bundle / "server"), "was modified", shard.name)
    with pytest.raises(BundleError, match="was modified"):
        load_protected_model(bundle / "server")


def test_tampered_manifest_is_refused(bundle):
    manifest = bundle / "client" / "stip-manifest.json"
    m = json.loads(manifest.read_text())
    m["files"]["embedding-token.safetensors"] = "0" * 64
    manifest.write_text(json.dumps(m))
    assert_fails(stip_cli("verify", bundle / "client"), "was modified", "signature does not match")
    with pytest.raises(BundleError, match="was modified: its signature"):
        ClientBundle.load(bundle / "client")
    # signed again by the same developer (the signature is fine): the wrong sha256 itself is caught
    m.pop("signature")
    signed = signing.sign_manifest(m, signing.load_signing_key(bundle / "developer" / signing.SIGNING_KEY_FILE))
    manifest.write_text(json.dumps(signed))
    assert_fails(stip_cli("verify", bundle / "client"), "was modified", "sha256 of embedding-token.safetensors")
    manifest.write_text("{not json")
    assert_fails(stip_cli("verify", bundle / "client"), "not valid JSON")


def test_tampered_key_file_is_refused(bundle):
    key = bundle / "client" / "client.stipkey"
    tensors = load_file(str(key))
    from safetensors import safe_open

    with safe_open(str(key), "pt") as f:
        meta = f.metadata()
    p = tensors["resid.perm"]
    p[[0, 1]] = p[[1, 0]]
    save_file(tensors, str(key), metadata=meta)
    assert_fails(stip_cli("inspect", key), "do not match its fingerprint")


def test_key_of_another_protection_is_refused(bundle, tiny_protected, tmp_path):
    plain, _ = tiny_protected("llama-gqa-untied")
    assert stip_cli("protect", plain, "--out", tmp_path / "other", "-q").returncode == 0
    other_key = tmp_path / "other" / "client" / "client.stipkey"
    assert_fails(stip_cli("verify", bundle / "client", "--key", other_key), "does not belong")
    with pytest.raises(KeyMismatchError):
        ClientBundle.load(bundle / "client", key=other_key)
    # a developer key drawn for another architecture cannot protect this model
    gpt2_plain, gpt2_out = tiny_protected("gpt2")
    r = stip_cli("protect", plain, "--out", tmp_path / "mismatch", "--key",
                 gpt2_out / "developer" / "developer.stipkey")
    assert_fails(r, "developer key was drawn for a model of shape")
    assert_nothing_written(tmp_path, "mismatch")


def test_missing_files_are_named(bundle, tmp_path):
    shard = next((bundle / "server").glob("*.safetensors"))
    shard.unlink()
    assert_fails(stip_cli("verify", bundle / "server"), "incomplete", shard.name)
    (bundle / "client" / "stip-manifest.json").unlink()
    assert_fails(stip_cli("verify", bundle / "client"), "stip-manifest.json is missing")
    assert_fails(stip_cli("protect", tmp_path / "nope", "--out", tmp_path / "o1"), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_fails(stip_cli("protect", tmp_path / "empty", "--out", tmp_path / "o2"), "config.json is missing")
    assert_nothing_written(tmp_path, "o1")
    assert_nothing_written(tmp_path, "o2")


def test_missing_shard_of_sharded_input(tmp_path):
    plain = save_tiny("mistral-gqa", tmp_path / "plain", max_shard_size="20KB")
    shards = sorted(plain.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    assert_fails(stip_cli("protect", plain, "--out", tmp_path / "out"), "incomplete", shards[-1].name)
    assert_nothing_written(tmp_path, "out")


def test_unsupported_architecture_names_it_and_lists_supported(tmp_path):
    ElectraForMaskedLM(ElectraConfig(vocab_size=50, hidden_size=32, embedding_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path / "electra")
    r = stip_cli("protect", tmp_path / "electra", "--out", tmp_path / "out")
    assert_fails(r, "'electra' is not supported", "llama", "mistral", "qwen2", "gpt2", "bert")
    assert_nothing_written(tmp_path, "out")


def test_unknown_tensor_stops_midway_and_leaves_nothing(tmp_path):
    """A tensor no rule covers must never reach the server unprotected; the run fails after writing part of it."""
    plain = save_tiny("llama-gqa-untied", tmp_path / "plain")
    state = load_file(str(plain / "model.safetensors"))
    state["model.layers.0.mlp.extra_adapter.weight"] = torch.zeros(4, 4)
    save_file(state, str(plain / "model.safetensors"), metadata={"format": "pt"})
    r = stip_cli("protect", plain, "--out", tmp_path / "out", "--shard-size", "1KB")
    assert_fails(r, "extra_adapter", "no protection rule")
    assert_nothing_written(tmp_path, "out")


def test_existing_output_is_not_overwritten_without_flag(tiny_protected, tmp_path):
    plain, _ = tiny_protected("gpt2")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert_fails(stip_cli("protect", plain, "--out", tmp_path / "out"), "already exists")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    r = stip_cli("protect", plain, "--out", tmp_path / "out", "--overwrite", "-q")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert stip_cli("verify", tmp_path / "out" / "server").returncode == 0
