"""Checkpoint layouts `protect` reads (safetensors or .bin, sharded or not) and the sharded bundle it writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import stip
from stip.client.bundle import ClientBundle
from stip.reference import compare_logits
from stip.server.model import load_protected_model
from tests.models import VOCAB, save_tiny


def _to_bin(folder, shards: int):
    """Rewrite a safetensors checkpoint as PyTorch .bin files (one, or several with an index)."""
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    names = list(state)
    weight_map = {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, folder / fname)
        weight_map |= {n: fname for n in part}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("layout", ["safetensors-sharded", "bin", "bin-sharded"])
def test_input_layouts(tmp_path, layout):
    plain_dir = save_tiny("qwen2-bias-tied", tmp_path / "plain",
                          **({"max_shard_size": "30KB"} if layout == "safetensors-sharded" else {}))
    if layout.startswith("bin"):
        _to_bin(plain_dir, 3 if layout == "bin-sharded" else 1)
    plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
    r = stip.protect(plain_dir, tmp_path / "out", progress=False, max_shard_bytes=40_000)
    assert len(list(r.server.glob("model-*-of-*.safetensors"))) > 1, "small --shard-size must shard the bundle"
    protected, _ = load_protected_model(r.server)
    eq = compare_logits(plain, protected, ClientBundle.load(r.client), torch.randint(0, VOCAB, (2, 11)))
    assert eq.top1_match == 1.0 and eq.max_abs_diff < 1e-4


def test_bf16_checkpoint_stays_bf16_and_exact(tmp_path):
    """Permutations are exact in any dtype: a bf16 model protects to bf16 with the same logits."""
    plain_dir = save_tiny("llama-gqa-untied", tmp_path / "plain")
    model = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    r = stip.protect(tmp_path / "bf16", tmp_path / "out", progress=False)
    shard = next(r.server.glob("*.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(shard)).values())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    protected, _ = load_protected_model(r.server)
    eq = compare_logits(plain, protected, ClientBundle.load(r.client), torch.randint(0, VOCAB, (1, 8)))
    assert eq.top1_match == 1.0 and eq.max_abs_diff < 1e-4
