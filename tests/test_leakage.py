"""Nothing secret reaches `server/`: no original tensor, no row- or column-identical copy, no key or embedding bytes,
and every per-layer transform is a real, distinct secret."""

from __future__ import annotations

import itertools
import stat

import pytest
import torch
from safetensors.torch import load_file

from stip.common.keys import ClientKey, DeveloperKey
from stip.common.layout import CLIENT_KEY_FILE, DEVELOPER_KEY_FILE
from tests.models import tiny_configs

TINY = list(tiny_configs())


def _server_tensors(out) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted((out / "server").glob("*.safetensors")):
        tensors |= load_file(str(shard))
    return tensors


def _rows(t: torch.Tensor) -> set[bytes]:
    return {r.contiguous().numpy().tobytes() for r in t}


@pytest.mark.parametrize("name", TINY)
def test_no_server_tensor_is_an_original_or_a_row_or_column_copy(tiny_protected, name):
    plain_dir, out = tiny_protected(name)
    plain = load_file(str(plain_dir / "model.safetensors"))
    server = _server_tensors(out)
    embedding = next(t for n, t in plain.items() if n.endswith(("embed_tokens.weight", "wte.weight")))
    for n, t in server.items():
        originals = [plain[n]] if n in plain else [embedding]  # a tied LM head comes from the embedding
        for orig in originals:
            assert t.shape == orig.shape
            assert not torch.equal(t, orig), n
            if t.dim() == 2:
                assert not (_rows(t) & _rows(orig)), f"{n} shares a row with the original"
                if t.shape[0] > 1:  # a [1, d] weight (Qwen2-MoE's shared-expert gate) is a vector: its single-value
                    # "columns" are moved, not hidden, as a norm weight's entries are
                    assert not (_rows(t.T) & _rows(orig.T)), f"{n} shares a column with the original"


@pytest.mark.parametrize("name", TINY)
def test_no_key_or_embedding_bytes_in_server_bundle(tiny_protected, name):
    """Tied models are the documented exception for one needle: their LM head *is* the embedding table, so the server
    holds its rows in the secret basis (rows and columns permuted); the plain rows never appear."""
    plain_dir, out = tiny_protected(name)
    tied = tiny_configs()[name][1].tie_word_embeddings
    key = DeveloperKey.load(out / "developer" / DEVELOPER_KEY_FILE)
    plain = load_file(str(plain_dir / "model.safetensors"))
    blob = b"".join(p.read_bytes() for p in sorted((out / "server").iterdir()))
    needles = []
    for perm in (key.client.resid.perm, key.client.vocab.perm, key.layers[0].ffn.perm):
        needles += [perm[:8].to(torch.int64).numpy().tobytes(), perm[:8].to(torch.int32).numpy().tobytes()]
    for n, t in plain.items():
        if n.endswith(("embed_tokens.weight", "wte.weight", "wpe.weight")):
            # the plain rows, and the rows as a client would send them (in the secret basis)
            needles.append(t[1].numpy().tobytes())
            if not (tied and not n.endswith("wpe.weight")):
                needles.append(key.client.resid.apply(t, 1)[1].numpy().tobytes())
    for needle in needles:
        assert needle not in blob
    assert not list((out / "server").glob("*.stipkey"))


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2"])
def test_every_layer_transform_is_a_secret_of_its_own(tiny_protected, name):
    _, out = tiny_protected(name)
    key = DeveloperKey.load(out / "developer" / DEVELOPER_KEY_FILE)
    assert not key.client.resid.is_identity() and not key.client.vocab.is_identity()
    spaces = [layer.spaces(key.geometry) for layer in key.layers]
    for per_layer in spaces:
        for space, t in per_layer.items():
            assert not t.is_identity(), space
    for a, b in itertools.combinations(spaces, 2):
        for space in a:
            assert not a[space].same_as(b[space]), space


def test_keys_are_owner_only_and_carry_version_and_fingerprint(tiny_protected):
    _, out = tiny_protected("llama-gqa-untied")
    for path in (out / "client" / CLIENT_KEY_FILE, out / "developer" / DEVELOPER_KEY_FILE):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "developer").stat().st_mode) == 0o700
    client = ClientKey.load(out / "client" / CLIENT_KEY_FILE)
    dev = DeveloperKey.load(out / "developer" / DEVELOPER_KEY_FILE)
    assert client.fingerprint == ClientKey(dev.client.bundle_id, dev.client.resid, dev.client.vocab).fingerprint
    assert client.fingerprint != dev.fingerprint


def test_two_protections_draw_unrelated_keys(tmp_path):
    import stip
    from tests.models import save_tiny

    plain = save_tiny("gpt2", tmp_path / "plain")
    a = stip.protect(plain, tmp_path / "a", progress=False)
    b = stip.protect(plain, tmp_path / "b", progress=False)
    ka, kb = (DeveloperKey.load(r.developer_key) for r in (a, b))
    assert a.bundle_id != b.bundle_id
    assert not ka.client.resid.same_as(kb.client.resid)
    assert not ka.layers[0].ffn.same_as(kb.layers[0].ffn)


@pytest.mark.slow
def test_smollm2_layer_transforms_are_distinct_secrets(smollm2_protected):
    """The real model's 30 layers: every per-layer transform is a real secret of its own, and the server bundle
    holds no key file and no client file."""
    key = DeveloperKey.load(smollm2_protected / "developer" / DEVELOPER_KEY_FILE)
    assert key.geometry.layers == 30 and key.geometry.rope and key.geometry.group == 3
    spaces = [layer.spaces(key.geometry) for layer in key.layers]
    for a, b in itertools.combinations(spaces, 2):
        for space in a:
            assert not a[space].is_identity() and not a[space].same_as(b[space]), space
    names = {p.name for p in (smollm2_protected / "server").iterdir()}
    assert not names & {"client.stipkey", "developer.stipkey", "embedding-token.safetensors", "tokenizer.json"}
