"""`stip protect --harden aloepri` (AloePri's covariant obfuscation, docs/aloepri.md) on tiny random LLaMA-family
models built in code: the key algebra, what is exact, the bundle as a stock checkpoint, and greedy decoding through a
real `stip serve` and `stip.Client` against the obfuscated checkpoint run in-process.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from stip.client.bundle import ClientBundle
from stip.client.sdk import Client
from stip.common.layout import DEVELOPER_KEY_FILE
from stip.developer.aloepri import protect_aloepri
from stip.developer.aloepri_keys import AloepriGeometry, AloepriKey
from stip.developer.aloepri_model import AloepriModel
from stip.developer.aloepri_options import AloepriOptions, HardenOptionError, fitted_h, parse_aloepri
from stip.reference import plain_greedy
from tests.models import build_tiny
from tests.parties import serve
from tests.test_server_decode import tiny_tokenizer

PROMPT = [3, 17, 42, 5, 9, 11]
SEED = b"\x07" * 32
EXACT = "h=0,lambda=0,alpha_e=0,alpha_h=0,beta=1"  # no expansion, orthogonal key, no noise, no RoPE-block shuffle
FAMILIES = ["llama-gqa-untied", "llama-mqa-tied", "mistral-gqa", "qwen2-bias-tied"]
TOKEN = "t"


def _save(name: str, folder):
    model = build_tiny(name)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


def _server_model(out):
    model, info = AutoModelForCausalLM.from_pretrained(out / "server", dtype=torch.float32,
                                                       output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


@pytest.mark.parametrize("h", [0, 7, 8])
def test_every_key_matrix_cancels_every_inverse_key_matrix(h):
    g = AloepriGeometry(24, 10, 1, 4, 2, 6, 16, (1.0, 0.1, 0.01))
    key = AloepriKey(SEED, AloepriOptions(h=h), g)
    ps = [key.key_matrix(f"w{i}") for i in range(3)]
    qs = [key.inverse_key_matrix(f"r{i}") for i in range(3)]
    assert ps[0].shape == (24, 24 + 2 * h) and qs[0].shape == (24 + 2 * h, 24)
    for p in ps:
        for q in qs:
            assert torch.allclose(p @ q, torch.eye(24, dtype=torch.float64), atol=1e-12)
    if h:  # fresh C and D each time: the P (and Q) differ, in the directions the other side cancels
        assert not torch.allclose(ps[0], ps[1]) and not torch.allclose(qs[0], qs[1])
    # the same label gives the same matrix: the seed is the whole key
    assert torch.equal(AloepriKey(SEED, AloepriOptions(h=h), g).key_matrix("w0"), ps[0])


def test_options_parse_and_refuse():
    o = parse_aloepri("h=64, lambda=0.1,alpha_e=0.5")
    assert (o.h, o.lam, o.alpha_e, o.alpha_h, o.beta) == (64, 0.1, 0.5, 0.2, 8)
    assert parse_aloepri(None) == AloepriOptions() and AloepriOptions().as_dict()["lambda"] == 0.3
    for bad in ("h=-2", "lambda=nan", "beta=0", "foo=1", "h", "alpha_e=x", "lam=0.1"):
        with pytest.raises(HardenOptionError):
            parse_aloepri(bad)
    assert fitted_h(128, 576, 9) == 135 and fitted_h(0, 576, 9) == 0 and fitted_h(4, 48, 6) == 6


@pytest.mark.parametrize("name", FAMILIES)
def test_exact_knobs_match_the_plain_model(tmp_path, name):
    """With no expansion, lambda 0, no noise and no block shuffle, kappa is 1 and the transform is exact: the
    bundle (a stock checkpoint, loaded without custom code) gives the plain logits up to float32 rounding."""
    plain = _save(name, tmp_path / "plain")
    protect_aloepri(tmp_path / "plain", tmp_path / "out", options=EXACT, progress=False, seed=SEED)
    server = _server_model(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "server" / "config.json").read_text())
    assert config["architectures"] == [type(plain).__name__] and not config["tie_word_embeddings"]
    assert "auto_map" not in config
    bundle = ClientBundle.load(tmp_path / "out" / "client")
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        diff = float((bundle.plain_logits(server(bundle.server_ids(ids)).logits) - plain(ids).logits).abs().max())
    print(f"{name}: exact knobs, max |logit difference| = {diff:.2e}")
    assert diff < 1e-3


def _oracle_norms(model, inverse_key: torch.Tensor, eps: float) -> None:
    """Replace every RMSNorm of the obfuscated `model` by one that divides by the PLAIN stream's RMS (x~ Q = x for
    any inverse key matrix Q): what kappa approximates."""
    q = inverse_key.float()

    def forward(x):
        return x * torch.rsqrt((x @ q).pow(2).mean(-1, keepdim=True) + eps)

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = forward


def test_everything_but_kappa_is_exact():
    """Default lambda, an expansion and the paper's noise, no block shuffle: with each norm dividing by the plain
    stream's RMS instead of kappa's estimate, the obfuscated model is exactly the plain model with the noisy
    embedding and LM head (the noise is part of the function, not an error)."""
    plain = build_tiny("llama-gqa-untied")
    state = dict(plain.state_dict())
    am = AloepriModel(plain.config, state, False, AloepriOptions(h=8, beta=1), SEED)
    obfuscated = type(plain)(am.config()).eval()
    obfuscated.load_state_dict(am.state_dict())
    noisy = type(plain)(plain.config).eval()
    gain = state["model.norm.weight"].double()
    head = (am.transform.lm_head() @ am.key.inverse_key_matrix("lm_head").pinverse().T)  # back to plain columns
    inverse_vocab = torch.argsort(am.key.vocab)
    noisy.load_state_dict({**state, "model.embed_tokens.weight": am.embedding.float(),
                           "lm_head.weight": (head[inverse_vocab] / gain).float()})
    ids = torch.tensor([PROMPT])
    server_ids = inverse_vocab[ids]
    with torch.no_grad():
        kappa_diff = float((obfuscated(server_ids).logits[..., inverse_vocab] - noisy(ids).logits).abs().max())
        _oracle_norms(obfuscated, am.key.inverse_key_matrix("oracle"), plain.config.rms_norm_eps)
        exact_diff = float((obfuscated(server_ids).logits[..., inverse_vocab] - noisy(ids).logits).abs().max())
    print(f"max |logit difference| from the noisy plain model: kappa {kappa_diff:.2e}, exact norms {exact_diff:.2e}")
    assert exact_diff < 1e-3 < kappa_diff


def test_serve_and_client_greedy_equal_the_in_process_reference(tmp_path):
    """The paper's defaults (lossy): `stip serve` on the server bundle alone and `stip.Client` with the client
    bundle generate exactly what transformers generates in-process from the obfuscated checkpoint, ids mapped."""
    from typer.testing import CliRunner

    from stip.cli import app

    _save("llama-gqa-untied", tmp_path / "plain")
    r = CliRunner().invoke(app, ["protect", str(tmp_path / "plain"), "--out", str(tmp_path / "out"), "--harden",
                                 "aloepri", "-q"])
    assert r.exit_code == 0, r.output
    assert "(server-decode, harden aloepri)" in r.output
    out = tmp_path / "out"
    bundle = ClientBundle.load(out / "client")
    assert bundle.mode == "server-decode" and bundle.harden == ("aloepri",) and bundle.token_embedding is None
    manifest = json.loads((out / "server" / "stip-manifest.json").read_text())
    assert manifest["aloepri"]["alpha_e"] == 1.0 and manifest["aloepri"]["h"] == 129  # 48 + 2 h: a multiple of 6
    server = _server_model(out)
    eos = [int(i) for i in bundle.server_ids(bundle.eos_token_ids)] if bundle.eos_token_ids else None
    want = bundle.plain_ids(torch.tensor(plain_greedy(server, bundle.server_ids(PROMPT).tolist(), 12, eos))).tolist()
    with serve(out, token=TOKEN) as running:
        g = Client(out / "client", running.url, token=TOKEN).generate(ids=PROMPT, max_tokens=12)
    print(f"greedy through stip serve: {g.token_ids}; in-process reference: {want}")
    assert g.token_ids == want and len(want) >= 1
    # its developer key is a seed: reusing or rotating it is refused by name, not with a KeyError
    for args in (["rekey", str(tmp_path / "plain"), "--from", str(out), "--out", str(tmp_path / "rekeyed")],
                 ["protect", str(tmp_path / "plain"), "--out", str(tmp_path / "again"), "--key",
                  str(out / "developer" / DEVELOPER_KEY_FILE)]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code != 0 and "cannot be reused or rotated" in r.output + str(r.exception), (args, r.output)
        assert "Traceback" not in r.output


def test_refusals(tmp_path):
    from typer.testing import CliRunner

    from stip.cli import app

    build_tiny("gpt2").save_pretrained(tmp_path / "gpt2")
    _save("llama-gqa-untied", tmp_path / "plain")
    cases = {("--harden", "aloepri", str(tmp_path / "gpt2")): "gpt2 models do not support --harden aloepri",
             ("--harden", "aloepri,mix"): "does not combine with --harden mix",
             ("--harden", "aloepri", "--noise", "0.1"): "does not combine with --noise",
             ("--harden", "aloepri", "--tee"): "does not combine with --tee",
             ("--aloepri", "h=4"): "add --harden aloepri",
             ("--harden", "aloepri", "--aloepri", "lambda=-1"): "bad --aloepri value: lambda=-1.0"}
    for args, message in cases.items():
        model = args[-1] if args[-1].endswith("gpt2") else str(tmp_path / "plain")
        flags = [a for a in args if a != model]
        r = CliRunner().invoke(app, ["protect", model, "--out", str(tmp_path / "x"), *flags])
        assert r.exit_code != 0 and message in r.output + str(r.exception), (args, r.output, r.exception)
        assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_smollm2_through_vllm_equals_the_in_process_reference(smollm2_aloepri):
    """SmolLM2 with the paper's defaults, protected by the CLI (tests/conftest.py): stock vLLM (`stip serve --engine
    vllm`) serves the bundle unchanged and generates what transformers generates from it in-process."""
    import contextlib
    import os
    from concurrent.futures import ThreadPoolExecutor

    from stip.server.launch import find_vllm_python, local_process
    from tests.parties import isolated_server_bundle, stopped_in_background

    python = find_vllm_python()
    if python is None and os.environ.get("STIP_REQUIRE_VLLM") != "1":
        pytest.skip("no Python with vLLM (.venv-vllm/bin/python or $STIP_VLLM_PYTHON)")
    out = smollm2_aloepri
    bundle = ClientBundle.load(out / "client")
    prompt = bundle.tokenizer("The capital of France is")["input_ids"]
    eos = [int(i) for i in bundle.server_ids(bundle.eos_token_ids)]
    # our engine on this bundle layout: test_serve_and_client_greedy_equal_the_in_process_reference (a tiny model)
    # the server and its bundle folder are stopped in the background (vLLM takes seconds to shut down)
    with stopped_in_background(contextlib.ExitStack()) as stack, ThreadPoolExecutor(1) as pool:
        only = stack.enter_context(isolated_server_bundle(out))
        server = local_process(lambda port: [python, "-m", "stip.cli", "serve", str(only), "--host", "127.0.0.1",
                                             "--port", str(port), "--engine", "vllm", "--vllm-arg",
                                             "max_model_len=1024"], "/health", TOKEN, {"VLLM_CPU_KVCACHE_SPACE": "1"},
                               600)
        starting = pool.submit(server.__enter__)  # vLLM starts (tens of seconds) while the reference runs here
        stack.callback(lambda: starting.exception() is None and server.__exit__(None, None, None))
        want = bundle.plain_ids(torch.tensor(plain_greedy(_server_model(out), bundle.server_ids(prompt).tolist(), 16,
                                                          eos))).tolist()
        g = Client(out / "client", starting.result().url, token=TOKEN).generate(ids=prompt, max_tokens=16)
    print(f"vllm: {g.token_ids} {g.text!r}")
    assert g.token_ids == want
