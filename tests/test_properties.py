"""Property tests (hypothesis) over random seeds and small shapes: transforms, keys, and whole-model equivalence."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from stip.common.keys import ClientKey, DeveloperKey, Geometry
from stip.common.transforms import KeyRng, SignedPermutation, rope_pair_rotation
from stip.common.architectures import architecture_for, geometry_of
from stip.developer.protect import protect_state_dict

seeds = st.binary(min_size=32, max_size=32)
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(seed=seeds, n=st.integers(1, 300))
def test_rng_draws_permutations(seed, n):
    p = KeyRng(seed).permutation(n)
    assert sorted(p.tolist()) == list(range(n))
    assert torch.equal(p, KeyRng(seed).permutation(n))


@SETTINGS
@given(seed=seeds, n=st.integers(2, 64), rows=st.integers(1, 5))
def test_out_and_in_roles_cancel(seed, n, rows):
    """W' = W[:, T] consumes x' = T x exactly: (W T^-T)(T x) = W x, and invert undoes apply."""
    rng = KeyRng(seed)
    t = SignedPermutation(rng.permutation(n), torch.where(rng.integers(n, 2) > 0, 1, -1).to(torch.int8))
    x = torch.randn(rows, n, dtype=torch.float64)
    w = torch.randn(7, n, dtype=torch.float64)
    assert torch.allclose(t.apply(x, 1) @ t.apply(w, 1, "in").T, x @ w.T)
    assert torch.equal(t.invert(t.apply(x, 1), 1), x)


@SETTINGS
@given(seed=seeds, half=st.integers(1, 16), pos=st.integers(0, 500))
def test_quarter_turns_commute_with_rope(seed, half, pos):
    """q.k after RoPE is unchanged when Q and K share a 90-degree pair rotation: exact, not approximate."""
    hd = 2 * half
    rng = KeyRng(seed)
    t = rope_pair_rotation(rng.integers(half, 4), hd)
    q, k = torch.randn(1, 1, 3, hd), torch.randn(1, 1, 3, hd)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.outer(torch.arange(pos, pos + 3).float(), inv_freq)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos()[None], emb.sin()[None]
    q1, k1 = apply_rotary_pos_emb(q, k, cos, sin)
    q2, k2 = apply_rotary_pos_emb(t.apply(q, 3), t.apply(k, 3), cos, sin)
    assert torch.allclose(q1 @ k1.transpose(-1, -2), q2 @ k2.transpose(-1, -2), atol=1e-5)
    assert torch.allclose(t.apply(q1, 3), q2, atol=1e-6)


@SETTINGS
@given(seed=seeds, kv=st.integers(1, 3), group=st.integers(1, 3), half=st.integers(1, 4),
       layers=st.integers(1, 3), rope=st.booleans())
def test_key_roundtrip_and_layer_secrets(tmp_path_factory, seed, kv, group, half, layers, rope):
    g = Geometry(hidden=12, vocab=20, layers=layers, heads=kv * group, kv_heads=kv, head_dim=2 * half, ffn=16,
                 rope=rope)
    try:
        key = DeveloperKey.generate(g, "b" * 32, KeyRng(seed))
    except ValueError as e:  # e.g. one KV head of 2 dims without RoPE: too few distinct non-identity layer keys
        assert "model too small" in str(e) and (kv, group, half, layers, rope) == (1, 2, 1, 3, False)
        return
    path = tmp_path_factory.mktemp("k") / "k.stipkey"
    key.save(path)
    again = DeveloperKey.load(path)
    assert again.fingerprint == key.fingerprint and again.geometry == g
    key.client.save(path.with_suffix(".client"))
    assert ClientKey.load(path.with_suffix(".client")).fingerprint == key.client.fingerprint
    for layer in key.layers:
        spaces = layer.spaces(g)
        assert len(spaces["attn_q"]) == g.heads * g.head_dim and len(spaces["attn_k"]) == kv * g.head_dim
        for space in spaces.values():
            assert sorted(space.perm.tolist()) == list(range(len(space)))


def _tiny(kind: str, d_head: int, kv: int, group: int, layers: int, tied: bool):
    heads = kv * group
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=31, n_embd=heads * d_head, n_layer=layers, n_head=heads, n_positions=32,
                         tie_word_embeddings=tied)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(vocab_size=31, hidden_size=heads * d_head, intermediate_size=24, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=d_head,
                      tie_word_embeddings=tied, attention_bias=True)
    return LlamaForCausalLM(cfg)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=seeds, kind=st.sampled_from(["llama", "gpt2"]), half=st.integers(1, 4), kv=st.integers(1, 3),
       group=st.integers(1, 3), layers=st.integers(1, 3), tied=st.booleans(), torch_seed=st.integers(0, 2**16))
def test_protected_model_equals_plain(seed, kind, half, kv, group, layers, tied, torch_seed):
    torch.manual_seed(torch_seed)
    model = _tiny(kind, 2 * half, 1 if kind == "gpt2" else kv, kv * group if kind == "gpt2" else group, layers,
                  tied)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    g = geometry_of(model.config)
    key = DeveloperKey.generate(g, "a" * 32, KeyRng(seed))
    state = {n: t for n, t in model.state_dict().items() if not (tied and n == "lm_head.weight")}
    server_state, client_state = protect_state_dict(architecture_for(model.config), key, state, tied)

    server_cfg = model.config.__class__.from_dict({**model.config.to_dict(), "tie_word_embeddings": False})
    server = type(model)(server_cfg).eval()
    missing, unexpected = server.load_state_dict(server_state, strict=False)
    assert not unexpected and all("embed_tokens" in m or "wte" in m for m in missing)

    ids = torch.randint(0, 31, (2, 9))
    x = key.client.resid.apply(client_state["token"][ids], 2)
    if "position" in client_state:
        x = x + key.client.resid.apply(client_state["position"][:9], 1)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        got = key.client.vocab.invert(server(inputs_embeds=x).logits, 2)
    assert torch.equal(ref.argmax(-1), got.argmax(-1))
    assert (ref - got).abs().max() < 1e-4
