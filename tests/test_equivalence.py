"""Lossless: the protected model, driven by the client bundle, computes the plain model's logits.

Full-sequence logits and 16 steps of incremental decoding with the KV cache, on tiny random models of every supported
architecture; greedy generation on the real SmolLM2 weights, protected with the CLI.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from stip.client.bundle import ClientBundle
from stip.reference import compare_logits, plain_greedy, protected_greedy
from stip.server.model import load_protected_model
from tests.models import VOCAB, tiny_configs

TINY = list(tiny_configs())


def _load(tiny_protected, name):
    plain_dir, out = tiny_protected(name)
    plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
    protected, _ = load_protected_model(out / "server")
    return plain, protected, ClientBundle.load(out / "client")


@pytest.mark.parametrize("name", TINY)
def test_full_sequence_logits_match(tiny_protected, name):
    plain, protected, client = _load(tiny_protected, name)
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    eq = compare_logits(plain, protected, client, ids)
    assert eq.top1_match == 1.0
    assert eq.max_abs_diff < 1e-5 * max(1.0, eq.logit_scale), eq


@pytest.mark.parametrize("name", TINY)
def test_incremental_decoding_with_kv_cache_matches(tiny_protected, name):
    """16 steps, one token per step, each embedding supplied by the client side; compared with the plain model
    decoding the same tokens with its own cache."""
    plain, protected, client = _load(tiny_protected, name)
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    plain_cache, prot_cache = DynamicCache(), DynamicCache()
    worst = 0.0
    with torch.no_grad():
        ref = plain(input_ids=ids, past_key_values=plain_cache, use_cache=True).logits[:, -1]
        got = protected(inputs_embeds=client.embed(ids), past_key_values=prot_cache, use_cache=True).logits[:, -1]
        pos = ids.shape[1]
        for _ in range(16):
            got = client.plain_logits(got)
            worst = max(worst, float((ref - got).abs().max()))
            assert int(ref.argmax()) == int(got.argmax())
            nxt = ref.argmax(-1, keepdim=True)
            ref = plain(input_ids=nxt, past_key_values=plain_cache, use_cache=True).logits[:, -1]
            got = protected(inputs_embeds=client.embed(nxt, start=pos), past_key_values=prot_cache,
                            use_cache=True).logits[:, -1]
            pos += 1
    assert worst < 1e-4


PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colours."}],
    "The quick brown fox",
    "def fibonacci(n):",
]


@pytest.mark.slow
def test_smollm2_greedy_generation_matches_token_for_token(smollm2_protected, smollm2_plain):
    plain, _ = smollm2_plain
    protected, manifest = load_protected_model(smollm2_protected / "server")
    client = ClientBundle.load(smollm2_protected / "client")
    tok = client.tokenizer
    assert manifest["model_type"] == "llama"
    for prompt in PROMPTS:
        if isinstance(prompt, list):
            ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        else:
            ids = tok(prompt)["input_ids"]
        want = plain_greedy(plain, ids, 40)  # no early stop: at least 32 tokens compared per prompt
        got = protected_greedy(protected, client, ids, 40)
        assert got == want, (prompt, tok.decode(got), tok.decode(want))
        eq = compare_logits(plain, protected, client, torch.tensor([ids + want]))
        assert eq.top1_match == 1.0
        assert eq.max_abs_diff < 1e-3 * eq.logit_scale, eq
