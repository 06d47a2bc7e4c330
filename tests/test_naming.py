"""No silently wrong model: checkpoint naming variants protect to the canonical names, and a checkpoint or server
bundle that does not hold exactly the tensors its model class expects is refused, naming the tensor.

transformers fills a parameter a checkpoint lacks with random values and drops tensors it does not know, without an
error; before this check, a hub-named GPT-2 (`wte.weight`, `h.0.…`, no `transformer.` prefix) protected to a server
bundle with no LM head and no zeroed position table, and the server answered with garbage.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import stip
from stip.client.bundle import ClientBundle
from stip.common import signing
from stip.common.bundles.manifest import resign
from stip.common.architectures import TOKEN_EMBEDDING, architecture_for
from stip.common.bundles.completeness import expected_tensors
from stip.reference import compare_logits, plain_greedy
from stip.errors import TensorSetError
from stip.server.model import load_protected_model
from tests.models import VOCAB, save_tiny, tiny_configs
from tests.parties import run_serve_expect_exit, serve
from tests.test_bad_input import assert_fails, assert_nothing_written, stip_cli


def _rewrite(folder, edit):
    """Apply `edit(state) -> state` to a single-file safetensors checkpoint."""
    path = folder / "model.safetensors"
    save_file(edit(load_file(str(path))), str(path), metadata={"format": "pt"})
    return folder


def _hub_gpt2(state):
    """Name a GPT-2 checkpoint as hub `gpt2` does: no `transformer.` prefix, causal-mask buffers kept, no LM head."""
    out = {k.removeprefix("transformer."): v for k, v in state.items()}
    n_pos = out["wpe.weight"].shape[0]
    for i in range(3):
        out[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
    return out


def _server_names(out):
    return set(json.loads((out / "server" / "model.safetensors.index.json").read_text())["weight_map"])


@pytest.mark.parametrize("name", list(tiny_configs()))
def test_rules_cover_the_model_class_under_its_own_names(name):
    """Every tensor the class loads has a rule whose canonical name is the class's own; the token-embedding role is
    the class's input embedding; the optional prefix is the class's base model prefix. A family whose bundle keeps
    the names `save_pretrained` writes (Mixtral's per-expert tensors, fused by the class) is checked on those."""
    cls, config = tiny_configs()[name]
    arch = architecture_for(config)
    with torch.device("meta"):
        model = cls(config)
    assert arch.base_prefix == model.base_model_prefix + "."
    emb = next(n for n, m in model.named_modules() if m is model.get_input_embeddings()) + ".weight"
    for tensor in (expected_tensors(config) if arch.saved_names else model.state_dict()):
        m = arch.match(tensor)
        assert m.canonical == tensor
        assert (m.rule.role == TOKEN_EMBEDDING) == (tensor == emb)
        assert arch.match(tensor.removeprefix(arch.base_prefix)).canonical == tensor


def test_hub_named_gpt2_protects_to_canonical_names_and_serves_like_plain(tmp_path):
    plain_dir = save_tiny("gpt2", tmp_path / "plain")
    hub_dir = _rewrite(save_tiny("gpt2", tmp_path / "hub"), _hub_gpt2)
    assert not any(k.startswith("transformer.") for k in load_file(str(hub_dir / "model.safetensors")))
    plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()

    out = tmp_path / "protected"
    stip.protect(hub_dir, out, progress=False)
    server_config = json.loads((out / "server" / "config.json").read_text())
    from transformers import GPT2Config

    expected = set(expected_tensors(GPT2Config(**server_config))) - {"transformer.wte.weight"}
    assert _server_names(out) == expected  # the LM head and the (zeroed) position table are there, canonical
    shard = load_file(str(next((out / "server").glob("model-*.safetensors"))))
    assert not shard["transformer.wpe.weight"].any()

    protected, _ = load_protected_model(out / "server")
    client = ClientBundle.load(out / "client")
    eq = compare_logits(plain, protected, client, torch.randint(0, VOCAB, (2, 12), generator=torch.Generator()
                                                                   .manual_seed(3)))
    print(f"hub-named GPT-2: max |logit diff| protected vs plain = {eq.max_abs_diff:.2e}")
    assert eq.top1_match == 1.0 and eq.max_abs_diff < 1e-4, f"max |logit diff| {eq.max_abs_diff:.2e}"

    prompt = [5, 17, 3, 88, 42, 9, 61, 23]
    with serve(out) as server:
        g = stip.Client(out / "client", server.url, downlink="logits").generate(ids=prompt, max_tokens=24)
    assert g.token_ids == plain_greedy(plain, prompt, 24), f"max |logit diff| in-process {eq.max_abs_diff:.2e}"


@pytest.mark.parametrize("name", ["llama-gqa-untied", "llama-mqa-tied"])
def test_llama_without_model_prefix(tmp_path, name):
    """transformers 5 loads a LlamaForCausalLM checkpoint named without `model.` (`layers.0.…`, `embed_tokens.weight`,
    `norm.weight`), so protect accepts it too and writes the canonical names."""
    plain_dir = save_tiny(name, tmp_path / "plain")
    bare_dir = _rewrite(save_tiny(name, tmp_path / "bare"),
                        lambda s: {k.removeprefix("model."): v for k, v in s.items()})
    assert "embed_tokens.weight" in load_file(str(bare_dir / "model.safetensors"))
    loaded, info = AutoModelForCausalLM.from_pretrained(bare_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # what makes accepting it correct
    plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()

    r = stip.protect(bare_dir, tmp_path / "protected", progress=False)
    names = _server_names(r.out)
    assert "lm_head.weight" in names and "model.norm.weight" in names
    assert all(n == "lm_head.weight" or n.startswith("model.") for n in names)
    protected, _ = load_protected_model(r.server)
    eq = compare_logits(plain, protected, ClientBundle.load(r.client), torch.randint(0, VOCAB, (2, 10)))
    assert eq.top1_match == 1.0 and eq.max_abs_diff < 1e-4, eq


def _drop(name):
    return lambda s: {k: v for k, v in s.items() if k != name}


def _add(name, shape):
    return lambda s: {**s, name: torch.zeros(shape)}


def _reshape(name):
    return lambda s: {**s, name: s[name][:-1].clone()}


BAD = {
    "missing": ("gpt2", lambda s: _drop("h.1.mlp.c_fc.bias")(_hub_gpt2(s)), "h.1.mlp.c_fc.bias", "lacks"),
    "extra layer": ("gpt2", _add("transformer.h.3.ln_1.weight", (48,)), "transformer.h.3.ln_1.weight",
                    "unexpected"),
    "no rule": ("gpt2", _add("transformer.h.0.attn.c_attn.scale", (48,)), "transformer.h.0.attn.c_attn.scale",
                "no protection rule"),
    "bias the config lacks": ("llama-gqa-untied", _add("model.layers.0.self_attn.q_proj.bias", (48,)),
                              "model.layers.0.self_attn.q_proj.bias", "unexpected"),
    "wrong shape": ("gpt2", lambda s: _reshape("h.0.mlp.c_fc.bias")(_hub_gpt2(s)), "h.0.mlp.c_fc.bias", "shape"),
    "wrong shape (vocab)": ("llama-gqa-untied", _reshape("lm_head.weight"), "lm_head.weight", "shape"),
    "named twice": ("gpt2", lambda s: {**s, "h.2.ln_2.bias": s["transformer.h.2.ln_2.bias"].clone()}, "h.2.ln_2.bias",
                    "named twice"),
}


CLI_CASES = ("missing", "extra layer", "wrong shape")  # the rest in-process: each CLI run costs a Python start


@pytest.mark.parametrize("case", list(BAD))
def test_checkpoint_that_does_not_match_its_model_class_is_refused(tmp_path, case):
    model, edit, tensor, words = BAD[case]
    bad = _rewrite(save_tiny(model, tmp_path / "bad"), edit)
    if case in CLI_CASES:
        result = stip_cli("protect", bad, "--out", tmp_path / "out", "--quiet")
        assert result.returncode == 2, result.stderr
        assert_fails(result, "error:", tensor, words)
    else:
        with pytest.raises(stip.StipError, match=words) as e:
            stip.protect(bad, tmp_path / "out", progress=False)
        assert tensor in str(e.value)
    assert_nothing_written(tmp_path, "out")


def damaged_copy(out, copy, edit):
    """A copy (at `copy`) of the protected output `out` whose server shard (and index) went through `edit`, its
    manifest rewritten and re-signed with the bundle's own developer key, so only the tensor check can object; the
    copy's server folder."""
    shutil.copytree(out, copy)
    server = copy / "server"
    shard = next(server.glob("model-*.safetensors"))
    state = edit(load_file(str(shard)))
    save_file(state, str(shard), metadata={"format": "pt"})
    index = json.loads((server / "model.safetensors.index.json").read_text())
    index["weight_map"] = {n: shard.name for n in state}
    (server / "model.safetensors.index.json").write_text(json.dumps(index))
    resign(server, copy / "developer" / signing.SIGNING_KEY_FILE)
    return server


@pytest.fixture()
def damaged(tiny_protected, tmp_path):
    """`damaged(edit)`: `damaged_copy` of the protected tiny GPT-2."""

    def make(edit):
        server = damaged_copy(tiny_protected("gpt2")[1], tmp_path / "protected", edit)
        assert stip_cli("verify", server).returncode == 0  # a self-consistent bundle
        return server

    return make


@pytest.mark.parametrize("edit, tensor, words", [
    (_drop("lm_head.weight"), "lm_head.weight", "lacks"),
    (_drop("transformer.wpe.weight"), "transformer.wpe.weight", "lacks"),
    (lambda s: {**s, "transformer.wpe.weight": torch.ones_like(s["transformer.wpe.weight"])},
     "transformer.wpe.weight", "all zeros"),
    (lambda s: {**s, "transformer.wte.weight": torch.zeros(VOCAB, 48)}, "transformer.wte.weight",
     "input embedding"),
    (_reshape("transformer.h.2.mlp.c_proj.bias"), "transformer.h.2.mlp.c_proj.bias", "shape"),
], ids=["no-lm-head", "no-wpe", "wpe-not-zero", "embedding-on-server", "wrong-shape"])
def test_server_refuses_a_bundle_that_does_not_match_its_model_class(damaged, edit, tensor, words):
    server = damaged(edit)
    with pytest.raises(TensorSetError, match=words) as e:
        load_protected_model(server)
    assert tensor in str(e.value)


def test_stip_serve_refuses_a_bundle_without_lm_head(damaged):
    result = run_serve_expect_exit(damaged(_drop("lm_head.weight")))
    assert result.returncode == 2, result.stderr
    assert_fails(result, "error:", "lm_head.weight", "lacks")
