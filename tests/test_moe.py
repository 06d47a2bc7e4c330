"""Mixtral-style MoE: the router and every expert permuted, the expert order itself a secret, outputs unchanged.

One tiny random Mixtral (4 SwiGLU experts, top-2 routing, 2 layers, GQA), saved with `save_pretrained` (per-expert
tensor names, as hub checkpoints have them) and protected once for the module with a fixed seed. Must show: equal
logits (max-abs difference printed), identical top-1 and greedy tokens, identical routing (the protected router picks
the slots that hold the experts the plain router picks, with the same weights), an expert order that really moved,
greedy generation through a real `stip serve`, and bundles with a missing, extra or wrong-shaped expert tensor
refused by name.
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
from stip.common.keys import DeveloperKey
from stip.developer.verify import compare_logits, plain_greedy, protected_greedy
from stip.errors import TensorSetError
from stip.server.model import load_protected_model
from tests.models import VOCAB, save_tiny, tiny_configs
from tests.parties import serve

NAME = "mixtral-moe"
CONFIG = tiny_configs()[NAME][1]
EXPERTS, TOP_K, LAYERS = CONFIG.num_local_experts, CONFIG.num_experts_per_tok, CONFIG.num_hidden_layers
PROMPT = [5, 17, 3, 88, 42, 9, 61, 23]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    plain_dir = save_tiny(NAME, root / "plain")
    result = stip.protect(plain_dir, root / "protected", progress=False, seed=bytes(range(32)))
    plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
    protected, _ = load_protected_model(result.server)
    return dict(plain_dir=plain_dir, out=result.out, plain=plain, protected=protected,
                client=ClientBundle.load(result.client), key=DeveloperKey.load(result.developer_key))


def _routing(model, run) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(selected experts [tokens, k], their weights) of every layer's router during `run()`."""
    seen: list = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda _m, _i, out: seen.append((out[2].clone(), out[1].clone())))
             for layer in model.model.layers]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_checkpoint_and_bundle_use_per_expert_names(moe):
    """The plain checkpoint is in save_pretrained's per-expert naming; the server bundle keeps that naming (which
    transformers fuses on load and vLLM reads), and holds no fused or plain-named tensor."""
    plain_names = set(load_file(str(moe["plain_dir"] / "model.safetensors")))
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in plain_names
    server = json.loads((moe["out"] / "server" / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(server) == plain_names - {"model.embed_tokens.weight"}
    assert not any("gate_up_proj" in n for n in server)


def test_logits_top1_and_routing_match_the_plain_model(moe):
    plain, protected, client, key = moe["plain"], moe["protected"], moe["client"], moe["key"]
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    eq = compare_logits(plain, protected, client, ids)
    print(f"mixtral: max |logit diff| protected vs plain = {eq.max_abs_diff:.2e} (logit scale {eq.logit_scale:.2f})")
    assert eq.top1_match == 1.0
    assert eq.max_abs_diff < 1e-5 * max(1.0, eq.logit_scale), eq

    want = _routing(plain, lambda: plain(input_ids=ids))
    got = _routing(protected, lambda: protected(inputs_embeds=client.embed(ids)))
    assert len(want) == len(got) == LAYERS
    for layer, ((p_idx, p_w), (s_idx, s_w)) in enumerate(zip(want, got)):
        order = key.layers[layer].experts.perm
        assert p_idx.shape == (ids.numel(), TOP_K)
        # slot k holds original expert order[k]: the protected selections, mapped back, are the plain ones
        assert torch.equal(order[s_idx], p_idx), f"layer {layer}: routing differs"
        assert torch.allclose(s_w, p_w, atol=1e-5), f"layer {layer}: routing weights differ"


def test_expert_order_is_permuted_and_each_slot_holds_its_expert(moe):
    """Some slot holds another expert than the plain model's; slot k's tensors are expert order[k]'s, under its own
    FFN permutation (rows of w1/w3, columns of w2) and `p`."""
    key = moe["key"]
    orders = [key.layers[i].experts.perm for i in range(LAYERS)]
    assert any(not torch.equal(o, torch.arange(EXPERTS)) for o in orders), orders
    plain = load_file(str(moe["plain_dir"] / "model.safetensors"))
    server = {}
    for shard in (moe["out"] / "server").glob("model-*.safetensors"):
        server |= load_file(str(shard))
    resid = key.client.resid
    for layer, order in enumerate(orders):
        base = f"model.layers.{layer}.block_sparse_moe."
        assert torch.equal(server[base + "gate.weight"],
                           resid.apply(plain[base + "gate.weight"], 1, "in")[order])
        for slot, expert in enumerate(order.tolist()):
            ffn = key.space("ffn", layer, expert=expert)
            for w in ("w1", "w3"):
                src = plain[f"{base}experts.{expert}.{w}.weight"]
                assert torch.equal(server[f"{base}experts.{slot}.{w}.weight"],
                                   resid.apply(ffn.apply(src, 0, "out"), 1, "in"))
            src = plain[f"{base}experts.{expert}.w2.weight"]
            assert torch.equal(server[f"{base}experts.{slot}.w2.weight"],
                               ffn.apply(resid.apply(src, 0, "out"), 1, "in"))


def test_greedy_generation_matches_in_process_and_through_stip_serve(moe):
    plain, protected, client = moe["plain"], moe["protected"], moe["client"]
    want = plain_greedy(plain, PROMPT, 16)
    assert protected_greedy(protected, client, PROMPT, 16) == want
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
    copy = tmp_path / "protected"
    shutil.copytree(moe["out"], copy)
    server = copy / "server"
    shard = next(server.glob("model-*.safetensors"))
    state = edit(load_file(str(shard)))
    save_file(state, str(shard), metadata={"format": "pt"})
    index = json.loads((server / "model.safetensors.index.json").read_text())
    index["weight_map"] = {n: shard.name for n in state}
    (server / "model.safetensors.index.json").write_text(json.dumps(index))
    signing.resign(server, copy / "developer" / signing.SIGNING_KEY_FILE)
    with pytest.raises(TensorSetError, match=words) as e:
        load_protected_model(server)
    assert tensor in str(e.value)
