"""Nothing secret reaches `server/`: no original tensor, no row- or column-identical copy, no key or embedding bytes,
and every per-layer transform is a real, distinct secret. Rows that are permutations of original rows (the same
values, moved) are what sorting attacks match on: the paper's scheme keeps them by design, and the test says so per
mode; the hardened modes must not."""

from __future__ import annotations

import itertools
import re
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import stip
from stip.common.keys import ClientKey, DeveloperKey
from stip.common.layout import CLIENT_KEY_FILE, DEVELOPER_KEY_FILE
from tests.models import save_tiny, tiny_configs

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


# ------------------------------------------------------------------ rows that keep their values (sorting attacks)

# The same multiset of values as an original row (equal once sorted) is what sorting attacks (vocabulary matching,
# sorted norm weights) exploit. A permutation moves values and keeps them, so the paper's scheme keeps every row's.
EVERYTHING, NOTHING = re.compile(""), re.compile("(?!)")
MODES = {  # mode -> (stip.protect options, the server tensors that keep original rows' values by design)
    "paper": ({}, EVERYTHING),  # the default: the paper's permutations
    "server-decode": ({"mode": "server-decode"}, EVERYTHING),  # the same, plus the permuted embedding table
    # a dense orthogonal Q on the residual stream, norms folded (docs/hardened.md); vectors over head dims alone,
    # Qwen2's Q/K/V biases, keep the paper's permutation: `rope` and `vo` mix those
    "harden-mix": ({"harden": "mix"}, re.compile(r"\.[qkv]_proj\.bias$")),
    "harden-all": ({"harden": "all"}, NOTHING),  # mix plus rope, vo (and ffn on LLaMA)
}
HARDENABLE = ["llama-gqa-untied", "qwen2-bias-tied", "gpt2"]  # the families --harden takes: untied, tied, GPT-2
CASES = [(name, "paper") for name in TINY] + [(name, mode) for mode in MODES if mode != "paper" for name in HARDENABLE]
ROPE_TURNED = re.compile(r"\.(q_proj|k_proj|qkv_proj)\.")  # the paper's quarter turns negate half of each head's rows


@pytest.fixture(scope="module")
def protected_in(tiny_protected, tmp_path_factory):
    """(name, mode) -> (plain folder, protected folder); the paper's bundles are the session's shared ones."""
    cache: dict[tuple[str, str], tuple] = {}

    def get(name: str, mode: str):
        if mode == "paper":
            return tiny_protected(name)
        if (name, mode) not in cache:
            plain, _ = tiny_protected(name)
            out = tmp_path_factory.mktemp(f"{name}-{mode}") / "protected"
            stip.protect(plain, out, progress=False, **MODES[mode][0])
            cache[name, mode] = plain, out
        return cache[name, mode]

    return get


def _originals(plain: dict[str, torch.Tensor], name: str) -> list[torch.Tensor]:
    """The plain tensors a server tensor may have come from: its namesake; the same weight of every expert of its
    layer (the experts are shuffled); the embedding table for a tied LM head."""
    def any_expert(n: str) -> str:
        return re.sub(r"\.experts\.\d+\.", ".experts.*.", n)

    if any_expert(name) != name:
        return [t for n, t in plain.items() if any_expert(n) == any_expert(name)]
    if name in plain:
        return [plain[name]]
    return [next(t for n, t in plain.items() if n.endswith(("embed_tokens.weight", "wte.weight")))]


def _sorted_vectors(tensors: list[torch.Tensor], axis: int, signed: bool) -> np.ndarray:
    """Every row (axis 0) or column (axis 1) of `tensors`, its values sorted: two vectors hold the same values in
    another order exactly when these are equal. Unsigned: magnitudes only (a permutation up to sign)."""
    vectors = np.concatenate([(t.reshape(1, -1) if t.dim() == 1 else t if axis == 0 else t.T).double().numpy()
                              for t in tensors])
    return np.sort(vectors if signed else np.abs(vectors), axis=1)


def _permuted_share(t: torch.Tensor, originals: list[torch.Tensor], axis: int, signed: bool = True) -> float:
    """Share of `t`'s rows (or columns) whose values are those of some original row (column), reordered: the
    nearest sorted original, in max-abs distance, within float tolerance of the original's scale. (numpy: tiny
    arrays, and torch's threads would wait on each other on a loaded CI machine.)"""
    mine, theirs = _sorted_vectors([t], axis, signed), _sorted_vectors(originals, axis, signed)
    tolerance = 1e-4 * np.abs(theirs).max() + 1e-12
    nearest = np.abs(mine[:, None, :] - theirs[None, :, :]).max(axis=2).min(axis=1)
    return float((nearest <= tolerance).mean())


@pytest.mark.parametrize("name, mode", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_server_rows_that_are_permutations_of_original_rows(protected_in, name, mode):
    """Paper and server-decode modes: every row and column of every server tensor is an original one reordered (RoPE's
    Q/K rows up to sign), which sorting attacks exploit: documented, and asserted so it cannot change unnoticed.
    Hardened modes: no other row or column keeps an original's values, not even up to sign."""
    plain_dir, out = protected_in(name, mode)
    plain = load_file(str(plain_dir / "model.safetensors"))
    by_design = MODES[mode][1]
    compared, leaked, not_kept = 0, {}, {}
    for n, t in _server_tensors(out).items():
        if not t.any():
            continue  # all zeros, so nothing to leak (round-trip GPT-2's wpe: the client adds the positions)
        originals = _originals(plain, n)
        axes = [0] if t.dim() == 1 else [0] + ([1] if t.shape[0] > 1 else [])  # a [1, d] weight is one vector
        exact = [_permuted_share(t, originals, axis) for axis in axes]
        up_to_sign = [_permuted_share(t, originals, axis, signed=False) for axis in axes]
        compared += 1
        if not by_design.search(n):
            if any(exact + up_to_sign):
                leaked[n] = exact + up_to_sign
        elif min(up_to_sign) < 1 or (min(exact) < 1 and not ROPE_TURNED.search(n)):
            not_kept[n] = exact + up_to_sign
    assert compared
    assert not leaked, f"{mode}: server rows or columns that are original ones reordered: {leaked}"
    assert not not_kept, f"{mode}: expected to keep every original row's values by design, but does not: {not_kept}"


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
