"""Generality: every supported decoder type, protected and served by a real `stip serve`, generates what the plain
model generates.

The types come from the registry (`ARCHITECTURES`), so a newly registered decoder family is tested here without
editing this file, and fails until `tests/models.py` gives it a tiny config. Each type runs through its own server
subprocess (the next type's server starts while a test runs: tests.parties.ServerPipeline): the server's logits for
a prompt, un-permuted by the client, are compared with the plain model's (max-abs difference printed, top-1 at every
position), then greedy generation through `stip.Client` must equal transformers' own `generate`. Also: a model type
no table covers, and a supported checkpoint with one tensor no rule covers, are refused by name before anything is
written.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, OlmoConfig, OlmoForCausalLM, Phi3Config

import stip
from stip.client.bundle import ClientBundle
from stip.client.transport import Downlink
from stip.common.keys import DeveloperKey
from stip.common.tasks import TEXT_GENERATION
from stip.common.transforms import KeyRng
from stip.common.architectures import ARCHITECTURES, architecture_for, geometry_of, task_of
from stip.developer.protect import protect_state_dict
from stip.reference import compare_logits, plain_greedy
from stip.errors import UnsupportedModelError
from stip.server.model import load_protected_model
from tests.models import VOCAB, _randomise, build_tiny, tiny_configs
from tests.parties import ServerPipeline, serve

TOKEN = "decoders-test-token"


def decoder_types() -> list[str]:
    """Every registered model type whose task is text generation (read from a default config of the type)."""
    return [t for arch in ARCHITECTURES for t in arch.model_types
            if task_of(AutoConfig.for_model(t)) == TEXT_GENERATION]


def tiny_for(model_type: str) -> str | None:
    """The first tiny config of `model_type` in tests/models.py."""
    return next((name for name, (_, cfg) in tiny_configs().items() if cfg.model_type == model_type), None)


DECODERS = decoder_types()


def test_every_supported_decoder_type_has_a_tiny_config():
    missing = [t for t in DECODERS if tiny_for(t) is None]
    assert not missing, f"supported decoder types without a tiny config in tests/models.py: {missing}"
    assert {"llama", "qwen3", "phi3", "gemma3_text", "gpt2"} <= set(DECODERS)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """model type -> (protected output folder, ServerPipeline): every type with a tiny config, protected up front."""
    outs = {}
    for model_type in DECODERS:
        name = tiny_for(model_type)
        if name is not None:
            root = tmp_path_factory.mktemp(model_type)
            build_tiny(name).save_pretrained(root / "plain")
            stip.protect(root / "plain", root / "out", progress=False, seed=bytes(range(32)))
            outs[model_type] = root / "out"
    pipeline = ServerPipeline({t: (lambda out=out: serve(out, token=TOKEN, threads=1)) for t, out in outs.items()})
    yield outs, pipeline
    pipeline.close()


@pytest.mark.parametrize("model_type", DECODERS)
def test_greedy_generation_through_the_server_equals_plain(model_type, served):
    name = tiny_for(model_type)
    assert name is not None, f"no tiny config for {model_type}"
    plain = build_tiny(name)
    outs, pipeline = served
    prompt = torch.randint(3, VOCAB, (9,), generator=torch.Generator().manual_seed(7)).tolist()
    with pipeline.use(model_type) as server:
        client = stip.Client(outs[model_type] / "client", server.url, token=TOKEN, downlink="logits")
        assert client.connection.info()["model_type"] == model_type
        bundle = client.bundle
        with client.connection.open_session() as session:
            r = session.prefill(bundle.embed(torch.tensor(prompt)), positions="all", downlink=Downlink("logits"))
        got = bundle.plain_logits(r.logits.float())
        with torch.no_grad():
            ref = plain(input_ids=torch.tensor([prompt])).logits[0].float()
        diff = float((got - ref).abs().max())
        top1 = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
        print(f"{model_type} ({name}): max-abs logit diff {diff:.2e} (logits up to {float(ref.abs().max()):.1f}), "
              f"top-1 agreement {top1:.0%} over {len(prompt)} positions")
        assert top1 == 1.0
        assert diff < 1e-4 * max(1.0, float(ref.abs().max()))
        gen = client.generate(ids=prompt, max_tokens=12, temperature=0)
    expected = plain_greedy(plain, prompt, 12, bundle.eos_token_ids)
    assert gen.token_ids == expected, f"{model_type}: server greedy {gen.token_ids} != plain generate {expected}"


def test_a_model_type_no_table_covers_is_refused_by_name(tmp_path):
    """A tiny OLMo (a decoder no table covers) is refused, naming its type, and nothing is written. (The CLI's
    rendering of this error, without a traceback, is tests/test_bad_input.py's.)"""
    config = OlmoConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2)
    OlmoForCausalLM(config).save_pretrained(tmp_path / "olmo")
    with pytest.raises(UnsupportedModelError, match="model type 'olmo' is not supported"):
        stip.protect(tmp_path / "olmo", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type", ["qwen3", "phi3", "gemma3_text"])
def test_an_unknown_tensor_in_a_supported_checkpoint_is_refused_by_name(model_type, tmp_path):
    build_tiny(tiny_for(model_type)).save_pretrained(tmp_path / "plain")
    shard = tmp_path / "plain" / "model.safetensors"
    tensors = load_file(str(shard))
    tensors["model.layers.1.self_attn.mystery_gate.weight"] = torch.ones(4, 4)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match=r"'model\.layers\.1\.self_attn\.mystery_gate\.weight'"):
        stip.protect(tmp_path / "plain", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_phi3_with_partial_rotary_embeddings_is_refused():
    config = Phi3Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                        num_attention_heads=4, partial_rotary_factor=0.5, pad_token_id=0)
    with pytest.raises(UnsupportedModelError, match="partial rotary"):
        geometry_of(config)


def test_gemma3_tied_scale_is_the_clients_alone(tmp_path):
    """Tied Gemma: the client's embeddings carry the model's sqrt(hidden) scale, the server's LM head (the same table)
    does not; full-sequence logits equal the plain model's."""
    cls, config = tiny_configs()["gemma3-text"]
    config = type(config).from_dict({**config.to_dict(), "tie_word_embeddings": True})
    torch.manual_seed(0)
    plain = _randomise(cls(config), 0)
    plain.save_pretrained(tmp_path / "plain")
    stip.protect(tmp_path / "plain", tmp_path / "out", progress=False)
    client = ClientBundle.load(tmp_path / "out" / "client")
    assert client.config["embedding_scale"] == pytest.approx(config.hidden_size ** 0.5)
    protected, _ = load_protected_model(tmp_path / "out" / "server")
    eq = compare_logits(plain, protected, client, torch.randint(0, VOCAB, (2, 12), generator=torch.Generator()
                                                                   .manual_seed(3)))
    print(f"gemma3 tied: max-abs logit diff {eq.max_abs_diff:.2e}, top-1 {eq.top1_match:.0%}")
    assert eq.top1_match == 1.0 and eq.max_abs_diff < 1e-4 * max(1.0, eq.logit_scale)


def test_qk_norm_weights_must_move_with_the_shared_head_transform():
    """Qwen3's key: one in-head move per layer shared by every KV head (signs may differ), not the identity; its
    q_norm/k_norm weights get that move. Protected with those weights left in place, the model diverges: the rule is
    what keeps it exact, not an accident of the weights (they are random, not ones)."""
    plain = build_tiny("qwen3-qknorm-tied")
    geometry = geometry_of(plain.config)
    assert geometry.qk_norm
    key = DeveloperKey.generate(geometry, "qk-norm-test", KeyRng(bytes(32)))
    for layer in key.layers:
        assert all(torch.equal(t.perm, layer.qk[0].perm) for t in layer.qk)
        assert not layer.spaces(geometry)["attn_qk_head"].is_identity()
    arch = architecture_for(plain.config)
    frozen = dataclasses.replace(arch, rules=tuple(
        dataclasses.replace(r, axes={}) if "_norm" in r.pattern and "self_attn" in r.pattern else r
        for r in arch.rules))
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    diffs = {}
    for label, table in (("rule", arch), ("weights left in place", frozen)):
        server, client = protect_state_dict(table, key, plain.state_dict(), tied=True)
        config = type(plain.config).from_dict({**plain.config.to_dict(), "tie_word_embeddings": False})
        protected = type(plain)(config).eval()
        protected.load_state_dict(server, strict=False)
        with torch.no_grad():
            x = key.client.resid.apply(client["token"][ids], -1)
            got = key.client.vocab.invert(protected(inputs_embeds=x).logits, -1)
            diffs[label] = float((got - plain(input_ids=ids).logits).abs().max())
    print(f"qwen3 max-abs logit diff: {diffs}")
    assert diffs["rule"] < 1e-4 and diffs["weights left in place"] > 1e-2
