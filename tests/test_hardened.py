"""Hardened modes of `stip protect` (--harden mix,rope,vo,ffn|all, --noise): same outputs as the plain model, what
each option changes in the server bundle, the key file, refusals; and `all` through a real `stip serve` + Client.

Tiny random models (tests/models.py): a LLaMA with GQA (6 query heads, 2 KV heads) and a GPT-2 (LayerNorm, Conv1D,
learned positions). Dense float32 mixing is not bit-exact: logits agree to ~1e-5, top-1 and greedy tokens exactly.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import stip
from stip.client.bundle import ClientBundle
from stip.client.sdk import Client
from stip.common.keys import ClientKey, DeveloperKey
from stip.common.layout import CLIENT_CONFIG_FILE
from stip.developer.protect import HardenOptionError
from stip.reference import plain_greedy
from stip.errors import BundleError, UnsupportedModelError
from tests.models import build_tiny, save_tiny
from tests.parties import ServerPipeline, serve

SEED = b"\7" * 32  # one seed for every protection: the paper's draws are shared, the hardened parts come after
OPTIONS = {"llama-gqa-untied": ("none", "mix", "rope", "vo", "ffn", "all"),
           "gpt2": ("none", "mix", "rope", "vo", "all")}
PROMPT = [5, 17, 3, 88, 42, 9, 61, 23]
MAX_ABS = 1e-4  # float32 rounding through dense mixing: measured 3e-6 to 1e-5 on these models


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """(model, option) -> protected folder; model -> plain folder. Each protection takes ~0.2 s. The `stip serve`
    of the tiny LLaMA's `all` bundle starts in the background at once ("server"), for the last test."""
    root = tmp_path_factory.mktemp("hardened")
    out = {}
    for model, options in OPTIONS.items():
        out[model] = save_tiny(model, root / model / "plain")
        for option in options:
            out[model, option] = stip.protect(out[model], root / model / option, seed=SEED, progress=False,
                                              harden=() if option == "none" else option).out
            if (model, option) == ("llama-gqa-untied", "all"):
                out["server"] = ServerPipeline({"all": lambda folder=out[model, option]: serve(folder)})
                out["server"]._start("all")  # now, in the background: the tests below run meanwhile
    yield out
    out["server"].close()


def _server_model(folder):
    return AutoModelForCausalLM.from_pretrained(folder / "server", dtype=torch.float32).eval()


def _state(folder):
    """The server bundle's tensors as written (no model class: it would add a random embedding table)."""
    from safetensors.torch import load_file

    return {n: t for f in sorted((folder / "server").glob("*.safetensors")) for n, t in load_file(str(f)).items()}


def _greedy_in_process(server, bundle: ClientBundle, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding through the protected model, the client's part done by the client bundle (no cache: tiny)."""
    ids, first = list(prompt), None
    with torch.no_grad():
        for _ in range(n):
            logits = bundle.plain_logits(server(inputs_embeds=bundle.embed(torch.tensor(ids))[None]).logits[0])
            first = logits if first is None else first
            ids.append(int(logits[-1].argmax()))
    return ids[len(prompt):], first


@pytest.mark.parametrize("model,option", [*(("llama-gqa-untied", o) for o in ("mix", "rope", "vo", "ffn", "all")),
                                          ("gpt2", "mix"), ("gpt2", "all")])  # GPT-2's rope, vo: inside all
def test_hardened_equals_plain(bundles, model, option):
    plain = build_tiny(model)
    bundle = ClientBundle.load(bundles[model, option] / "client")
    tokens, logits = _greedy_in_process(_server_model(bundles[model, option]), bundle, PROMPT, 12)
    with torch.no_grad():
        ref = plain(torch.tensor([PROMPT])).logits[0]
    diff = float((logits - ref).abs().max())
    print(f"{model} --harden {option}: max-abs logit difference {diff:.2e}")
    assert diff < MAX_ABS
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))
    assert tokens == plain_greedy(plain, PROMPT, 12)
    expected = ("mix", "rope", "vo", "ffn") if option == "all" else (option,)
    assert bundle.harden == tuple(o for o in expected if o in OPTIONS[model])
    assert bundle.manifest["harden"] == list(bundle.harden) and bundle.manifest["noise"] == 0.0


# which server tensors each option changes, relative to the paper's protection under the same seed
CHANGES = {
    "llama-gqa-untied": {"rope": ("q_proj", "k_proj"), "vo": ("v_proj", "o_proj"), "ffn": ("up_proj", "down_proj")},
    "gpt2": {"rope": ("c_attn",), "vo": ("c_attn", "attn.c_proj")},
}


@pytest.mark.parametrize("model,option", [(m, o) for m, c in CHANGES.items() for o in c])
def test_each_option_changes_only_its_tensors(bundles, model, option):
    paper, hard = _state(bundles[model, "none"]), _state(bundles[model, option])
    changed = {n for n in paper if not torch.equal(paper[n], hard[n])}
    assert changed and all(any(part in n for part in CHANGES[model][option]) for n in changed), changed
    if option == "ffn":  # exact power-of-two scalings of the up projection's rows
        ratio = hard["model.layers.0.mlp.up_proj.weight"] / paper["model.layers.0.mlp.up_proj.weight"]
        k = torch.log2(ratio[:, 0])
        assert torch.equal(k, k.round()) and torch.equal(ratio, ratio[:, :1].expand_as(ratio)) and k.abs().max() > 0


@pytest.mark.parametrize("model", OPTIONS)
def test_mix_leaves_no_norm_vector(bundles, model):
    state = _state(bundles[model, "mix"])
    norms = {n: t for n, t in state.items() if ("norm" in n or ".ln_" in n or n.startswith("transformer.ln_f"))}
    assert norms
    for name, t in norms.items():
        if name.endswith("weight"):
            assert torch.equal(t, torch.ones_like(t)), name
        elif name != "transformer.ln_f.bias":  # GPT-2's LM head has no bias: ln_f keeps beta/gamma, mixed by Q
            assert torch.equal(t, torch.zeros_like(t)), name
    paper = _state(bundles[model, "none"])
    assert any(not torch.equal(t, torch.ones_like(t)) for n, t in paper.items() if n in norms)  # the paper's has them


@pytest.mark.parametrize("model,option", [("llama-gqa-untied", "none"), ("llama-gqa-untied", "mix"),
                                          ("gpt2", "mix")])
def test_residual_matrix_reproduces_client_rows(bundles, model, option):
    bundle = ClientBundle.load(bundles[model, option] / "client")
    r = torch.from_numpy(bundle.key.residual_matrix())
    plain = build_tiny(model).get_input_embeddings().weight.detach().double()
    ids = torch.tensor(PROMPT)
    sent = bundle.embed(ids).double()
    if model == "gpt2":
        sent = sent - torch.from_numpy(bundle.position_embedding[: len(PROMPT)]).double()
    torch.testing.assert_close(sent, plain[ids] @ r, atol=1e-5, rtol=0)
    torch.testing.assert_close(r @ r.T, torch.eye(r.shape[0], dtype=torch.float64), atol=1e-10, rtol=0)
    if option == "none":  # the paper's key: a permutation matrix
        assert torch.equal(r.abs().sum(0), torch.ones(r.shape[0], dtype=torch.float64)) and not bundle.key.mixed
    else:
        assert bundle.key.mixed and float((r.abs() > 1e-3).float().mean()) > 0.9  # dense
    if model == "gpt2" and option == "mix":  # LayerNorm: Q keeps the all-ones direction
        ones = torch.ones(1, r.shape[0], dtype=torch.float64)
        torch.testing.assert_close(ones @ r, ones, atol=1e-10, rtol=0)


def test_keys_old_and_new(bundles, tmp_path):
    paper = DeveloperKey.load(bundles["llama-gqa-untied", "none"] / "developer" / "developer.stipkey")
    assert paper.harden == () and not any(n.endswith(("mix", "scale")) for n in paper.tensors())
    src = bundles["llama-gqa-untied", "all"] / "developer" / "developer.stipkey"
    hard = DeveloperKey.load(src)
    assert hard.harden == ("mix", "rope", "vo", "ffn") and paper.fingerprint != hard.fingerprint
    # the fingerprint covers the new fields: one changed angle in the file is a corrupt key
    raw = src.read_bytes()
    value = hard.layers[1].qk_mix[1, 0, 0]  # cos of a random angle
    needle = value.numpy().tobytes()
    assert needle in raw
    path = tmp_path / "k.stipkey"
    path.write_bytes(raw.replace(needle, (value + 1e-3).numpy().tobytes(), 1))
    with pytest.raises(BundleError, match="fingerprint"):
        DeveloperKey.load(path)
    client = ClientKey.load(bundles["llama-gqa-untied", "all"] / "client" / "client.stipkey")
    assert client.mixed and "resid.mix" in client.tensors() and "resid.perm" not in client.tensors()


def test_refusals(bundles, tmp_path, monkeypatch, capsys):
    qwen3 = save_tiny("qwen3-qknorm-tied", tmp_path / "qwen3")
    with pytest.raises(UnsupportedModelError, match=r"qwen3 models do not support --harden mix"):
        stip.protect(qwen3, tmp_path / "a", harden="mix", progress=False)
    with pytest.raises(UnsupportedModelError, match=r"qwen3 models do not support --noise"):
        stip.protect(qwen3, tmp_path / "a", noise=0.01, progress=False)
    with pytest.raises(UnsupportedModelError, match=r"gpt2 models do not support --harden ffn"):
        stip.protect(bundles["gpt2"], tmp_path / "a", harden="ffn", progress=False)
    with pytest.raises(HardenOptionError, match="unknown hardening option 'twist'"):
        stip.protect(bundles["gpt2"], tmp_path / "a", harden="mix,twist", progress=False)
    with pytest.raises(HardenOptionError, match="server-decode"):
        stip.protect(bundles["gpt2"], tmp_path / "a", harden="all", mode="server-decode", progress=False)
    with pytest.raises(HardenOptionError, match="--noise"):
        stip.protect(bundles["gpt2"], tmp_path / "a", noise=float("nan"), progress=False)
    assert not (tmp_path / "a").exists()  # nothing half-written
    from stip.cli import main  # the CLI's own entry point, in process: an error line, exit status 2

    for args, message in ((["--harden", "all"], "qwen3 models do not support --harden all"),
                          (["--harden", "mix", "--noise", "2"], "--noise must be a number in [0, 1)")):
        model = qwen3 if args[1] == "all" else bundles["gpt2"]
        monkeypatch.setattr(sys, "argv", ["stip", "protect", str(model), "--out", str(tmp_path / "b"), "-q", *args])
        with pytest.raises(SystemExit) as exit_:
            main()
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_noise_is_calibrated_and_a_function_of_the_context(bundles, tmp_path):
    out = stip.protect(bundles["llama-gqa-untied"], tmp_path / "noisy", harden="all", noise=0.03, seed=SEED,
                       progress=False)
    assert out.harden == ("mix", "rope", "vo", "ffn") and out.noise == 0.03
    config = json.loads((out.client / CLIENT_CONFIG_FILE).read_text())
    assert config["noise"] == 0.03 and config["harden"] == ["mix", "rope", "vo", "ffn"]
    noisy, exact = (ClientBundle.load(f / "client") for f in (out.out, bundles["llama-gqa-untied", "all"]))
    ids = torch.tensor(PROMPT * 40)
    a, b, clean = noisy.embed(ids), noisy.embed(ids), exact.embed(ids)
    # the same context gets the same noise (a replay or a repeat gives a server nothing to average: see
    # tests/test_trust_client.py); another client process draws its own
    assert torch.equal(a, b) and not torch.equal(a, ClientBundle.load(out.client).embed(ids))
    table = build_tiny("llama-gqa-untied").get_input_embeddings().weight.detach()
    expected = 0.03 * float(table.pow(2).mean().sqrt())
    measured = float((a - clean).std())
    assert abs(measured - expected) < 0.1 * expected, (measured, expected)


def test_all_through_real_server_and_client(bundles):
    """`--harden all` on the tiny LLaMA (GQA), through `stip serve` and `stip.Client`: plain greedy tokens, both
    downlinks."""
    folder = bundles["llama-gqa-untied", "all"]
    plain = AutoModelForCausalLM.from_pretrained(bundles["llama-gqa-untied"], dtype=torch.float32).eval()
    expected = plain_greedy(plain, PROMPT, 24)
    with bundles["server"].use("all") as server:
        for downlink in ("topk", "logits"):
            client = Client(folder / "client", server.url, downlink=downlink, k=16)
            assert client.generate(ids=PROMPT, max_tokens=24).token_ids == expected, downlink
