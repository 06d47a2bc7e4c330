"""Sparse MoE (Mixtral, Qwen3-MoE): the router and every expert permuted, the expert order itself a secret, outputs
unchanged.

Tiny random models (4 SwiGLU experts, top-2 routing, 2 layers, GQA; Qwen3-MoE with Q/K norms, unnormalized top-k
weights and one dense layer), saved with `save_pretrained` (per-expert tensor names, as hub checkpoints have them)
and each protected once for the module with a fixed seed. Must show: equal logits (max-abs difference printed),
identical top-1 and greedy tokens, identical routing (the protected router picks the slots that hold the experts the
plain router picks, with the same weights), an expert order that really moved, greedy generation through a real
`stip serve` (Mixtral here; every decoder type in tests/test_decoders.py), and bundles with a missing, extra or
wrong-shaped expert tensor refused by name.
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
from stip.common.keys import DeveloperKey
from stip.reference import compare_logits, plain_greedy, protected_greedy
from stip.errors import TensorSetError
from stip.server.model import load_protected_model
from tests.models import VOCAB, save_tiny, tiny_configs
from tests.parties import serve
from tests.test_naming import damaged_copy

NAME = "mixtral-moe"
# per family: the router, one expert's tensor names ({e}: expert index, {w}: projection), its gate/up and down names
FAMILIES = {
    "mixtral-moe": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.{w}.weight", ("w1", "w3"), "w2"),
    "qwen3-moe": ("mlp.gate.weight", "mlp.experts.{e}.{w}.weight", ("gate_proj", "up_proj"), "down_proj"),
    "qwen2-moe": ("mlp.gate.weight", "mlp.experts.{e}.{w}.weight", ("gate_proj", "up_proj"), "down_proj"),
}
PROMPT = [5, 17, 3, 88, 42, 9, 61, 23]


def _moe_layers(config) -> list[int]:
    return [i for i in range(config.num_hidden_layers) if i not in (getattr(config, "mlp_only_layers", None) or [])]


@pytest.fixture(scope="module")
def protected_moe(tmp_path_factory):
    """name -> the plain and protected model, bundles and key; built on first use."""
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            plain_dir = save_tiny(name, root / "plain")
            result = stip.protect(plain_dir, root / "protected", progress=False, seed=bytes(range(32)))
            plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
            protected, _ = load_protected_model(result.server)
            config = tiny_configs()[name][1]
            cache[name] = dict(plain_dir=plain_dir, out=result.out, plain=plain, protected=protected,
                               client=ClientBundle.load(result.client), key=DeveloperKey.load(result.developer_key),
                               layers=_moe_layers(config), experts=plain.config.num_experts_per_tok)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def moe(protected_moe):
    return protected_moe(NAME)


def _routing(model, layers, run) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(selected experts [tokens, k], their weights) of each MoE layer's router during `run()`."""
    seen: list = []
    hooks = [model.model.layers[i].mlp.gate.register_forward_hook(
        lambda _m, _i, out: seen.append((out[2].clone(), out[1].clone()))) for i in layers]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("name", list(FAMILIES))
def test_checkpoint_and_bundle_use_per_expert_names(protected_moe, name):
    """The plain checkpoint is in save_pretrained's per-expert naming; the server bundle keeps that naming (which
    transformers fuses on load and vLLM reads), and holds no fused tensor."""
    moe = protected_moe(name)
    _, expert, _, down = FAMILIES[name]
    plain_names = set(load_file(str(moe["plain_dir"] / "model.safetensors")))
    assert f"model.layers.0.{expert.format(e=3, w=down)}" in plain_names
    server = json.loads((moe["out"] / "server" / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(server) == plain_names - {"model.embed_tokens.weight"}
    assert not any("gate_up_proj" in n or n.endswith("experts.down_proj") for n in server)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_top1_and_routing_match_the_plain_model(protected_moe, name):
    moe = protected_moe(name)
    plain, protected, client, key = moe["plain"], moe["protected"], moe["client"], moe["key"]
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    eq = compare_logits(plain, protected, client, ids)
    print(f"{name}: max |logit diff| protected vs plain = {eq.max_abs_diff:.2e} (logit scale {eq.logit_scale:.2f})")
    assert eq.top1_match == 1.0
    assert eq.max_abs_diff < 1e-5 * max(1.0, eq.logit_scale), eq

    want = _routing(plain, moe["layers"], lambda: plain(input_ids=ids))
    got = _routing(protected, moe["layers"], lambda: protected(inputs_embeds=client.embed(ids)))
    assert len(want) == len(got) == len(moe["layers"]) > 0
    for layer, (p_idx, p_w), (s_idx, s_w) in zip(moe["layers"], want, got):
        order = key.layers[layer].experts.perm
        assert p_idx.shape == (ids.numel(), moe["experts"])
        # slot k holds original expert order[k]: the protected selections, mapped back, are the plain ones
        assert torch.equal(order[s_idx], p_idx), f"layer {layer}: routing differs"
        assert torch.allclose(s_w, p_w, atol=1e-5), f"layer {layer}: routing weights differ"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_expert_order_is_permuted_and_each_slot_holds_its_expert(protected_moe, name):
    """Some slot holds another expert than the plain model's; slot k's tensors are expert order[k]'s, under its own
    FFN permutation (rows of gate/up, columns of down) and `p`."""
    moe = protected_moe(name)
    router, expert_name, ups, down = FAMILIES[name]
    key = moe["key"]
    orders = {i: key.layers[i].experts.perm for i in moe["layers"]}
    assert any(not torch.equal(o, torch.arange(len(o))) for o in orders.values()), orders
    plain = load_file(str(moe["plain_dir"] / "model.safetensors"))
    server = {}
    for shard in (moe["out"] / "server").glob("model-*.safetensors"):
        server |= load_file(str(shard))
    resid = key.client.resid
    for layer, order in orders.items():
        base = f"model.layers.{layer}."
        assert torch.equal(server[base + router], resid.apply(plain[base + router], 1, "in")[order])
        for slot, expert in enumerate(order.tolist()):
            ffn = key.space("ffn", layer, expert=expert)
            for w in ups:
                src = plain[base + expert_name.format(e=expert, w=w)]
                assert torch.equal(server[base + expert_name.format(e=slot, w=w)],
                                   resid.apply(ffn.apply(src, 0, "out"), 1, "in"))
            src = plain[base + expert_name.format(e=expert, w=down)]
            assert torch.equal(server[base + expert_name.format(e=slot, w=down)],
                               ffn.apply(resid.apply(src, 0, "out"), 1, "in"))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_generation_matches_in_process(protected_moe, name):
    moe = protected_moe(name)
    assert protected_greedy(moe["protected"], moe["client"], PROMPT, 16) == plain_greedy(moe["plain"], PROMPT, 16)


def test_greedy_generation_through_stip_serve_matches(moe):
    want = plain_greedy(moe["plain"], PROMPT, 16)
    with serve(moe["out"], threads=1) as server:
        got = stip.Client(moe["out"] / "client", server.url).generate(ids=PROMPT, max_tokens=16)
    assert got.token_ids == want


def test_a_checkpoint_missing_an_expert_is_refused_by_name(moe, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(moe["plain_dir"], bad)
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    state = load_file(str(bad / "model.safetensors"))
    del state[name]
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TensorSetError, match="lacks") as e:
        stip.protect(bad, tmp_path / "out", progress=False)
    assert name in str(e.value)
    assert not (tmp_path / "out").exists()


def _drop(name):
    return lambda s: {k: v for k, v in s.items() if k != name}


@pytest.mark.parametrize("edit, tensor, words", [
    (_drop("model.layers.0.block_sparse_moe.experts.1.w2.weight"),
     "model.layers.0.block_sparse_moe.experts.1.w2.weight", "lacks"),
    (lambda s: {**s, "model.layers.0.block_sparse_moe.experts.4.w1.weight": torch.zeros(40, 48)},
     "model.layers.0.block_sparse_moe.experts.4.w1.weight", "unexpected"),
    (lambda s: {**s, "model.layers.1.block_sparse_moe.experts.0.w1.weight":
                s["model.layers.1.block_sparse_moe.experts.0.w1.weight"][:-1].clone()},
     "model.layers.1.block_sparse_moe.experts.0.w1.weight", "shape"),
    (lambda s: {**s, "model.layers.0.mlp.experts.gate_up_proj": torch.zeros(4, 80, 48)},
     "model.layers.0.mlp.experts.gate_up_proj", "unexpected"),
], ids=["missing-expert", "extra-expert", "wrong-shape", "fused-beside-per-expert"])
def test_server_refuses_a_bundle_with_a_bad_expert_tensor(moe, tmp_path, edit, tensor, words):
    """The bundle edited and re-signed with its own developer key, so only the tensor check can object."""
    server = damaged_copy(moe["out"], tmp_path / "protected", edit)
    with pytest.raises(TensorSetError, match=words) as e:
        load_protected_model(server)
    assert tensor in str(e.value)
