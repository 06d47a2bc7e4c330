"""`stip protect --head client` (docs/head-client.md): the server bundle holds neither the embedding nor the LM head,
the server returns the final hidden state, and the client's own (float16, memory-mapped) head makes the logits.

Tiny random models (tests/models.py), every bundle served by ONE real `stip serve` holding them all as contexts:
the paper's mode on a tied LLaMA, `--harden all` on an untied LLaMA and on GPT-2 (LayerNorm folded, learned
positions), Gemma 3 (final logit soft-capping moves to the client) and `--harden aloepri`. Greedy decoding through
`stip.Client` must equal the mode's own in-process reference: the same key's head-on-the-server bundle (AloePri: its
server-decode checkpoint of the same seed) run by transformers with its LM head rounded to float16, the one rounding
the mode adds; the logits' distance from the plain model is printed.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import stip
from stip.client.bundle import ClientBundle
from stip.client.head import ClientHead
from stip.client.http import ws_url
from stip.client.sdk import Client
from stip.client.session import ws_connect
from stip.client.transport import Downlink
from stip.common import wire
from stip.developer.aloepri import protect_aloepri
from stip.developer.harden_options import HardenOptionError, check_head
from stip.errors import KeyMismatchError, StipError, UnsupportedModelError
from stip.reference import plain_greedy
from stip.server.engines import load_engine
from stip.server.launch import local_server
from tests.models import build_tiny, save_tiny
from tests.parties import isolated_server_bundle, stopped_in_background
from tests.test_aloepri import _save

SEED = b"\5" * 32
PROMPT = [5, 17, 3, 88, 42, 9, 61, 23]
TOKEN = "t"
CASES = {"paper": ("llama-mqa-tied", ()), "all": ("llama-gqa-untied", "all"), "gpt2": ("gpt2", "all"),
         "gemma": ("gemma3-text", ())}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """name -> protected folder; "plain:<model>" -> plain folder. Each CASE also as "<name>-server": the same key
    (the same seed; paper: the same key file and signer), head on the server, the in-process reference. Besides:
    "aloepri" (head client) and "aloepri-sd" (the same seed, server-decode: the reference); "other" (head on the
    server) and "other-client" (its key, head on the client)."""
    root = tmp_path_factory.mktemp("head-client")
    out = {}
    for name, (model, harden) in CASES.items():
        plain = out[f"plain:{model}"] = save_tiny(model, root / "plain" / model)
        out[name] = stip.protect(plain, root / name, seed=SEED, harden=harden, head="client", progress=False).out
        if name != "paper":
            out[f"{name}-server"] = stip.protect(plain, root / f"{name}-server", seed=SEED, harden=harden,
                                                 progress=False).out
    _save("llama-gqa-untied", root / "aloepri-plain")
    knobs = "calibration_tokens=32"  # the paper's noise and expansion; kappa from fewer tokens (the test's time)
    out["aloepri"] = protect_aloepri(root / "aloepri-plain", root / "aloepri", seed=SEED, progress=False,
                                     options=knobs, head="client").out
    out["aloepri-sd"] = protect_aloepri(root / "aloepri-plain", root / "aloepri-sd", seed=SEED, progress=False,
                                        options=knobs).out
    dev = out["paper"] / "developer"
    out["paper-server"] = stip.protect(out["plain:llama-mqa-tied"], root / "paper-server", progress=False,
                                       key=dev / "developer.stipkey", signing_key=dev / "signing.key").out
    out["other"] = stip.protect(out["plain:llama-mqa-tied"], root / "other", progress=False).out
    dev = out["other"] / "developer"
    out["other-client"] = stip.protect(out["plain:llama-mqa-tied"], root / "other-client", progress=False,
                                       key=dev / "developer.stipkey", signing_key=dev / "signing.key",
                                       head="client").out
    return out


@pytest.fixture(scope="module")
def server(bundles):
    """One real `stip serve` (batching on) over every head-client bundle and one head-server bundle ("other"), each
    from an isolated copy of its server bundle alone."""
    stack = contextlib.ExitStack()
    dirs = [stack.enter_context(isolated_server_bundle(bundles[n])) for n in (*CASES, "aloepri", "other")]
    with stopped_in_background(stack):
        yield stack.enter_context(local_server(*dirs, "--threads", "1", token=TOKEN))


def _server_tensors(folder) -> set[str]:
    names = set()
    for shard in (folder / "server").glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            names |= set(f.keys())
    return names


def _reference(folder, n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy ids from PROMPT and the prompt's logits, in-process: a head-on-the-server bundle's checkpoint run by
    transformers with its head rounded to float16, driven by its client bundle (tiny: no KV cache)."""
    bundle = ClientBundle.load(folder / "client")
    server, ids, first = fp16_head(AutoModelForCausalLM.from_pretrained(folder / "server", dtype=torch.float32)), \
        list(PROMPT), None
    with torch.no_grad():
        while len(ids) < len(PROMPT) + n and (len(ids) == len(PROMPT) or ids[-1] not in bundle.eos_token_ids):
            logits = bundle.plain_logits(server(inputs_embeds=bundle.embed(torch.tensor(ids))[None]).logits[0])
            first = logits if first is None else first
            ids.append(int(logits[-1].argmax()))
    return ids[len(PROMPT):], first


def fp16_head(model):
    """The model with its LM head rounded to float16 (untied from the embedding): what --head client computes."""
    model.lm_head.weight = torch.nn.Parameter(model.get_output_embeddings().weight.detach().half().float())
    return model.eval()


def test_server_bundle_holds_no_head_and_the_client_a_float16_one(bundles):
    for name in (*CASES, "aloepri"):
        names = _server_tensors(bundles[name])
        assert not {"lm_head.weight", "model.embed_tokens.weight", "transformer.wte.weight"} & names, name
        for role in ("server", "client", "developer"):
            assert json.loads((bundles[name] / role / "stip-manifest.json").read_text())["head"] == "client"
        head = ClientBundle.load(bundles[name] / "client").head
        assert head.weight.dtype == np.float16 and head.weight.shape == (97, head.hidden_size), name
    # the client's head is the server's head of the same key, rounded to float16 once
    with safe_open(str(next((bundles["paper-server"] / "server").glob("*.safetensors"))), "pt") as f:
        server_head = f.get_tensor("lm_head.weight")
    assert "lm_head.weight" in _server_tensors(bundles["paper-server"])
    assert torch.equal(torch.from_numpy(np.array(ClientBundle.load(bundles["paper"] / "client").head.weight)),
                       server_head.half())


@pytest.mark.parametrize("name", CASES)
def test_greedy_through_the_client_equals_the_reference(bundles, server, name):
    bundle = ClientBundle.load(bundles[name] / "client")
    want, ref_logits = _reference(bundles[f"{name}-server"], 16)
    for downlink in ("topk", "logits"):
        client = Client(bundle, server.url, token=TOKEN, downlink=downlink, k=8)
        g = client.generate(ids=PROMPT, max_tokens=16)
        assert g.token_ids == want, downlink
        d = bundle.head.hidden_size
        assert g.timing.steps == 0 or d * 4 < g.timing.bytes_received_per_token < d * 4 + 200  # one hidden row
    with client.connection.open_session() as s:  # every position's logits, made by the client's head
        r = s.prefill(bundle.embed(torch.tensor(PROMPT)), positions="all", downlink=Downlink("logits"))
    got = bundle.plain_logits(r.logits)
    with torch.no_grad():
        plain = build_tiny(CASES[name][0])(torch.tensor([PROMPT])).logits[0]
    diff, exact = float((got - plain).abs().max()), float((got - ref_logits).abs().max())
    print(f"--head client {name}: max-abs logit difference {exact:.1e} from the reference, {diff:.1e} from the "
          f"plain model (its head in float32; logits up to {float(plain.abs().max()):.1f})")
    assert exact < 1e-4 and diff < 1e-2 and r.head_ms > 0
    assert torch.equal(got.argmax(-1), plain.argmax(-1))


def test_scoring_uses_the_client_head(bundles, server):
    """Prompt scoring (targets): the server gets no targets; the client picks each token's logit itself."""
    client = Client(bundles["gemma"] / "client", server.url, token=TOKEN)
    scored = client.score(ids=PROMPT, top=2)
    lp = torch.log_softmax(_reference(bundles["gemma-server"], 1)[1], -1)
    assert scored[0] is None
    for i, s in enumerate(scored[1:], start=1):
        assert abs(s.logprob - float(lp[i - 1, PROMPT[i]])) < 1e-4
        assert [t for t, _ in s.top] == lp[i - 1].topk(2).indices.tolist()


def test_aloepri_greedy_equals_its_checkpoint(bundles, server):
    """--harden aloepri --head client (round-trip bundles) against the server-decode checkpoint of the same seed run
    in-process, its LM head rounded to float16."""
    sd = bundles["aloepri-sd"]
    ref = fp16_head(AutoModelForCausalLM.from_pretrained(sd / "server", dtype=torch.float32))
    ids_sd = ClientBundle.load(sd / "client")
    eos = [int(i) for i in ids_sd.server_ids(ids_sd.eos_token_ids)] if ids_sd.eos_token_ids else None
    want = ids_sd.plain_ids(torch.tensor(plain_greedy(ref, ids_sd.server_ids(PROMPT).tolist(), 12, eos))).tolist()
    bundle = ClientBundle.load(bundles["aloepri"] / "client")
    assert bundle.mode == "round-trip" and bundle.harden == ("aloepri",) and bundle.token_embedding is not None
    g = Client(bundle, server.url, token=TOKEN).generate(ids=PROMPT, max_tokens=12)
    assert g.token_ids == want and len(want) >= 1


def test_placements_that_disagree_are_refused(bundles, server):
    # the same key and signer, the head on the server: this client has no head for the hidden states
    with pytest.raises(KeyMismatchError, match="holds no LM head"):
        Client(bundles["paper-server"] / "client", server.url, token=TOKEN)
    # the head on the client, but the server's bundle (same key) holds one too
    with pytest.raises(KeyMismatchError, match="holds one too"):
        Client(bundles["other-client"] / "client", server.url, token=TOKEN)


def _raw_step(server, bundle_id: str, downlink: dict, d: int) -> dict:
    """One prefill over a bare WebSocket (no client checks): the server's own answer."""
    ws = ws_connect(ws_url(server.url, wire.SESSION_PATH),
                    additional_headers={"Authorization": f"Bearer {TOKEN}", wire.BUNDLE_HEADER: bundle_id})
    try:
        wire.decode_frame(ws.recv(timeout=30))
        x = torch.zeros(2, d)
        ws.send(wire.encode_frame(wire.request_header("prefill", x.shape, torch.float32, "last", downlink),
                                  wire.tensor_bytes(x)))
        return wire.decode_frame(ws.recv(timeout=30))[0]
    finally:
        ws.close()


def test_the_server_answers_only_its_own_downlink(bundles, server):
    paper, other = (ClientBundle.load(bundles[n] / "client") for n in ("paper", "other"))
    h = _raw_step(server, paper.bundle_id, {"kind": "topk", "k": 4}, paper.hidden_size)
    assert h["status"] == 400 and "holds no LM head" in h["error"]
    h = _raw_step(server, paper.bundle_id, {"kind": "hidden", "dtype": "float16"}, paper.hidden_size)
    assert h["ok"] and h["kind"] == "hidden" and h["dtype"] == "float16" and h["shape"] == [1, paper.hidden_size]
    h = _raw_step(server, other.bundle_id, {"kind": "hidden"}, other.hidden_size)
    assert h["status"] == 400 and "holds the LM head" in h["error"]


def test_refusals(bundles, tmp_path):
    from typer.testing import CliRunner

    from stip.cli import app

    plain = str(bundles["plain:llama-mqa-tied"])
    for args, message in {("--mode", "server-decode"): "needs round-trip mode",
                          ("--tee",): "does not combine with --tee", }.items():
        r = CliRunner().invoke(app, ["protect", plain, "--out", str(tmp_path / "x"), "--head", "client", *args])
        assert r.exit_code != 0 and message in r.output + str(r.exception), (r.output, r.exception)
        assert "Traceback" not in r.output and not (tmp_path / "x").exists()
    with pytest.raises(HardenOptionError, match="--head must be one of"):
        check_head("gpu", "round-trip", False, "text-generation")
    with pytest.raises(UnsupportedModelError, match="no LM head to move"):
        check_head("client", "round-trip", False, "feature-extraction")
    with pytest.raises(StipError, match="holds no LM head.*--engine transformers"):  # before vLLM is imported
        load_engine("vllm", bundles["paper"] / "server")


def test_rekey_keeps_the_head_on_the_client(bundles, tmp_path):
    from stip.developer.rekey import rekey

    r = rekey(bundles["plain:llama-mqa-tied"], bundles["paper"], tmp_path / "rekeyed", progress=False)
    assert r.head == "client" and (r.client / "head.safetensors").is_file()
    assert "lm_head.weight" not in _server_tensors(r.out)


def test_the_head_is_mapped_not_read(bundles):
    """The float16 head is a copy-on-write map of the bundle's file: loading it reads no rows."""
    head = ClientHead(bundles["all"] / "client" / "head.safetensors")
    assert head.weight is head.mapped and not head.mapped.flags["OWNDATA"]  # numpy over the file's pages
    with open("/proc/self/maps") as maps:
        assert str(head.path.resolve()) in maps.read()
