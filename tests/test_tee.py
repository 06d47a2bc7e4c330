"""TEE mode: the attested channel, simulated reports and their verifier, sealing; and (below) a real `stip serve
--tee-worker`, a real `stip enclave` and the TEE client end to end."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from stip.client.tee import SimulatedVerifier, TeeError, verify_report
from stip.common.channel import Channel, new_keypair, public_bytes
from stip.common.tee.platform import SimulatedPlatform
from stip.common.tee.sealing import seal_tensors, sealing_key, unseal_tensors
from stip.common.tee_protocol import SESSION_PATH
from stip.server.launch import local_process, server_env
from tests.models import build_tiny
from tests.parties import serve

MEASUREMENT = "ab" * 32


def pair(nonce=b"n" * 32, measurement=MEASUREMENT):
    c, e = new_keypair(), new_keypair()
    kw = dict(client_public=public_bytes(c), enclave_public=public_bytes(e), nonce=nonce, measurement=measurement)
    return Channel.derive(c, public_bytes(e), role="client", **kw), Channel.derive(e, public_bytes(c), role="enclave", **kw)


def test_channel_round_trip_and_refusals():
    client, enclave = pair()
    m0, m1 = client.seal_json({"op": "generate", "ids": [1, 2]}), client.seal_json({"op": "close"})
    assert enclave.open_json(m0) == {"op": "generate", "ids": [1, 2]}
    with pytest.raises(TeeError, match="replayed"):
        enclave.open(m0)
    tampered = bytearray(m1)
    tampered[-1] ^= 1
    with pytest.raises(TeeError, match="failed authentication"):
        enclave.open(bytes(tampered))
    assert enclave.open_json(m1) == {"op": "close"}  # a refused message does not advance the sequence
    reply = enclave.seal_json({"token": 5})
    assert client.open_json(reply) == {"token": 5}
    other_client, _ = pair()  # another channel (other keys) cannot read this one's messages
    with pytest.raises(TeeError, match="failed authentication"):
        pair()[1].open(other_client.seal(b"x"))


def test_channel_keys_bound_to_transcript():
    """A different measurement (or nonce) on one side gives different keys: the first message fails."""
    c, e = new_keypair(), new_keypair()
    kw = dict(client_public=public_bytes(c), enclave_public=public_bytes(e), nonce=b"n" * 32)
    client = Channel.derive(c, public_bytes(e), role="client", measurement="a" * 64, **kw)
    enclave = Channel.derive(e, public_bytes(c), role="enclave", measurement="b" * 64, **kw)
    with pytest.raises(TeeError, match="failed authentication"):
        enclave.open(client.seal(b"hello"))


@pytest.fixture(scope="module")
def platform():
    return SimulatedPlatform.generate()


def check(report, platform, nonce, allow=True, measurement=MEASUREMENT, **kw):
    return verify_report(report, expected_measurement=measurement, nonce=nonce, allow_simulated=allow,
                         verifiers={"stip-simulated-v1": SimulatedVerifier(platform.pin())}, **kw)


def test_simulated_report_verifies(platform):
    key, nonce = new_keypair(), os.urandom(32)
    v = check(platform.report(MEASUREMENT, public_bytes(key), nonce), platform, nonce)
    assert v.public_key == public_bytes(key) and v.measurement == MEASUREMENT and v.simulated


def test_report_refusals(platform, tmp_path):
    key, nonce = public_bytes(new_keypair()), os.urandom(32)
    good = platform.report(MEASUREMENT, key, nonce)
    with pytest.raises(TeeError, match="SIMULATED"):
        check(good, platform, nonce, allow=False)
    with pytest.raises(TeeError, match="forged"):  # signed by another platform key
        check(SimulatedPlatform.generate().report(MEASUREMENT, key, nonce), platform, nonce)
    signed = json.loads(base64.b64decode(good["evidence"]))
    signed["report"]["channel_public_key"] = base64.b64encode(public_bytes(new_keypair())).decode()
    with pytest.raises(TeeError, match="forged"):  # a swapped channel key breaks the signature
        check({**good, "evidence": base64.b64encode(json.dumps(signed).encode()).decode()}, platform, nonce)
    with pytest.raises(TeeError, match="wrong measurement"):
        check(good, platform, nonce, measurement="cd" * 32)
    with pytest.raises(TeeError, match="replayed"):  # a report for another (earlier) nonce
        check(good, platform, os.urandom(32))
    with pytest.raises(TeeError, match="stale"):
        check(platform.report(MEASUREMENT, key, nonce, timestamp=time.time() - 3600), platform, nonce)
    with pytest.raises(TeeError, match="future"):
        check(platform.report(MEASUREMENT, key, nonce, timestamp=time.time() + 3600), platform, nonce)
    with pytest.raises(TeeError, match="no verifier"):
        check({"format": "aws-nitro-v1", "evidence": "AAAA"}, platform, nonce)
    platform.save(tmp_path / "platform.key")
    assert SimulatedPlatform.load(tmp_path / "platform.key").pin() == platform.pin()
    assert oct((tmp_path / "platform.key").stat().st_mode & 0o777) == "0o600"


def test_sealing_bound_to_code_and_platform(tmp_path):
    secret, code = os.urandom(32), "c" * 64
    tensors = {"p": torch.randperm(16), "embed": torch.randn(8, 16)}
    path = tmp_path / "enclave.sealed"
    seal_tensors(path, tensors, sealing_key(secret, code), bundle_id="b", code_measurement=code)
    assert tensors["embed"].numpy().tobytes() not in path.read_bytes()
    header, out = unseal_tensors(path, sealing_key(secret, code))
    assert header["bundle_id"] == "b" and all(torch.equal(out[k], tensors[k]) for k in tensors)
    for other in (sealing_key(os.urandom(32), code), sealing_key(secret, "d" * 64)):
        with pytest.raises(TeeError, match="cannot unseal"):
            unseal_tensors(path, other)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(TeeError, match="cannot unseal"):
        unseal_tensors(path, sealing_key(secret, code))


# ---------------------------------------------------------------------------------------------- end to end

WORKER_TOKEN = "worker-token"
CLIENT_TOKEN = "client-token"  # the enclaves here require it (stip enclave --token / STIP_TOKEN)
PROMPT = [5, 17, 3, 42, 8, 11]


def enclave_command(bundle, worker_url, *extra):
    return lambda port: [sys.executable, "-m", "stip.cli", "enclave", str(bundle), "--worker", worker_url,
                         "--port", str(port), *extra]


@contextlib.contextmanager
def tee_stack(out):
    """A real `stip serve --tee-worker` on the TEE worker bundle and a real `stip enclave` beside it."""
    with serve(out, "--tee-worker", token=WORKER_TOKEN) as worker, \
            local_process(enclave_command(out / "enclave", worker.url), "/health",
                          env={"STIP_WORKER_TOKEN": WORKER_TOKEN, "STIP_TOKEN": CLIENT_TOKEN}) as enclave:
        yield worker, enclave


@pytest.fixture(scope="module")
def stacks(tee_stacks):
    """name -> (name, protected folder, worker, enclave): each tiny model's stack (tests/conftest.py `tee_stacks`,
    shared with the other TEE test modules)."""
    return tee_stacks


@pytest.fixture
def stack(stacks):
    return stacks("gpt2")


def plain_greedy(name, ids, n):
    model = build_tiny(name)
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist(), model


def tee_client(out, enclave, **kw):
    from stip.client.tee import TeeClient

    return TeeClient(out / "tee-client", enclave.url, allow_simulated=kw.pop("allow_simulated", True),
                     token=kw.pop("token", CLIENT_TOKEN), **kw)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-untied"])
def test_tee_generation_equals_plain(stacks, name):
    """Greedy through client -> enclave -> worker equals plain transformers generation, token for token; the top
    log-probabilities the enclave returns are the plain model's; two sessions at once both stay exact."""
    _, out, _, enclave = stacks(name)
    expected, model = plain_greedy(name, PROMPT, 10)
    client = tee_client(out, enclave)
    g = client.generate(ids=PROMPT, max_tokens=10, logprobs=3)
    assert g.token_ids == expected and g.finish_reason == "length"
    assert g.glimpse["tee"]["simulated"] and g.glimpse["tee"]["worker_ms"] > 0
    assert g.glimpse["tee"]["pad_hits"] + g.glimpse["tee"]["pad_misses"] > 0  # the pad pool's count (issue 23)
    import httpx

    pads = httpx.get(f"{enclave.url}/health", timeout=10).json()["pads"]
    assert pads["hits"] + pads["misses"] > 0 and 0 <= pads["hit_rate"] <= 1
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([PROMPT])).logits[0, -1].double(), -1)
    assert [i for i, _ in g.logprobs[0].top] == torch.topk(lp, 3).indices.tolist()
    assert abs(g.logprobs[0].logprob - float(lp[expected[0]])) < 1e-4
    other = PROMPT[::-1]
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda ids: client.generate(ids=ids, max_tokens=6).token_ids, [PROMPT, other])
    assert a == expected[:6] and b == plain_greedy(name, other, 6)[0]
    streamed = client.stream(ids=PROMPT, max_tokens=4)
    list(streamed)
    assert streamed.generation.token_ids == expected[:4]


def test_tee_client_bundle_holds_nothing_secret(stack):
    _, out, _, _ = stack
    files = {p.name for p in (out / "tee-client").rglob("*")}
    assert not any(f.endswith(".stipkey") or f.startswith("embedding") for f in files)
    from safetensors.torch import load_file

    table = load_file(str(out / "client" / "embedding-token.safetensors"))["weight"]
    row = table[3].numpy().tobytes()
    for d in ("tee-client", "enclave"):  # the enclave's copy is sealed
        assert not any(row in p.read_bytes() for p in (out / d).rglob("*") if p.is_file())


def test_tee_refusals(stack):
    """Each refusal is a TeeError naming the check, and the enclave keeps serving afterwards."""
    from websockets.sync.client import connect

    _, out, _, enclave = stack
    with pytest.raises(TeeError, match="SIMULATED"):
        tee_client(out, enclave, allow_simulated=False).generate(ids=PROMPT, max_tokens=2)
    with pytest.raises(TeeError, match="wrong measurement"):
        tee_client(out, enclave, measurement="00" * 32).generate(ids=PROMPT, max_tokens=2)
    for token in (None, "wrong"):  # the enclave requires its client token: no attestation, no session without it
        with pytest.raises(TeeError, match="refused to attest \\(401\\).*client token"):
            tee_client(out, enclave, token=token).generate(ids=PROMPT, max_tokens=2)
    with pytest.raises(Exception, match="401"):
        connect(enclave.url.replace("http://", "ws://") + SESSION_PATH).recv(timeout=10)
    client = tee_client(out, enclave)
    ws_url = enclave.url.replace("http://", "ws://") + SESSION_PATH

    def hello(nonce):
        ws = connect(ws_url, additional_headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})
        ws.send(json.dumps({"client_public_key": base64.b64encode(public_bytes(new_keypair())).decode(),
                            "nonce": base64.b64encode(nonce).decode()}))
        return ws

    v, nonce = client.attest()
    hello(nonce).close()  # the nonce's one channel
    with pytest.raises(TeeError, match="already used"):  # the enclave's side: a replayed nonce opens nothing
        client._recv(hello(nonce), None)
    ws, channel = client.open()  # a tampered ciphertext: the enclave closes the session, naming it
    frame = bytearray(channel.seal_json({"op": "generate", "ids": PROMPT, "max_tokens": 2}))
    frame[-1] ^= 1
    ws.send(bytes(frame))
    with pytest.raises(TeeError, match="failed authentication"):
        client._recv(ws, channel)
    ws, channel = client.open()  # a replayed (re-sent) sealed frame
    first = channel.seal_json({"op": "generate", "ids": PROMPT, "max_tokens": 1})
    ws.send(first)
    assert client._recv(ws, channel)["finish_reason"] == "length"
    ws.send(first)
    with pytest.raises(TeeError, match="replayed"):
        client._recv(ws, channel)
    ws, channel = client.open()  # a bad request inside the channel: a 422, the session goes on
    ws.send(channel.seal_json({"op": "generate", "ids": [], "max_tokens": 1}))
    assert client._recv(ws, channel)["status"] == 422
    ws.close()
    assert client.generate(ids=PROMPT, max_tokens=2).token_ids == plain_greedy(stack[0], PROMPT, 2)[0]


def test_enclave_refuses_another_platform(stack, tmp_path):
    """A sealed bundle does not open on another platform: `stip enclave` exits with the reason, no traceback."""
    _, out, worker, _ = stack
    other = tmp_path / "other-platform.key"
    SimulatedPlatform.generate().save(other)
    port = 1 + 0  # never bound: the enclave stops before serving
    r = subprocess.run(enclave_command(out / "enclave", worker.url, "--platform-key", str(other))(port),
                       capture_output=True, text=True, timeout=120,
                       env=server_env(None, {"STIP_WORKER_TOKEN": WORKER_TOKEN}))
    assert r.returncode == 2 and "cannot unseal" in r.stderr and "Traceback" not in r.stderr


def test_enclave_refuses_another_runs_worker(stacks):
    """An enclave started against a worker that serves another `stip protect --tee` run's bundle (other secret
    bases: every answer would be garbage) refuses to start, naming both bundles."""
    from stip.enclave.process import SimulatedEnclave
    from stip.enclave.worker_link import WebSocketWorkerLink, WorkerError

    _, out, _, _ = stacks("gpt2")
    _, _, other_worker, _ = stacks("llama-gqa-untied")
    link = WebSocketWorkerLink(other_worker.url, token=WORKER_TOKEN)
    try:
        with pytest.raises(WorkerError, match="the TEE worker serves bundle .* this enclave's bundle is"):
            SimulatedEnclave(out / "enclave", SimulatedPlatform.load(out / "tee-platform" / "platform.key"), link)
    finally:
        link.shutdown()


def test_proxy_serves_a_tee_bundle(stack):
    """The OpenAI proxy over a TEE client bundle: same endpoints, tokens from the enclave (ids in, as a tiny model
    has no tokenizer), equal to plain greedy."""
    from fastapi.testclient import TestClient

    from stip.client.proxy import create_app

    name, out, _, enclave = stack
    # the key-less proxy answers only requests addressed to loopback (stip.client.proxy_guard)
    with TestClient(create_app(tee_client(out, enclave)), base_url="http://localhost") as http:
        r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0,
                                               "logprobs": 2})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert r.json()["usage"]["completion_tokens"] == 5 and choice["finish_reason"] == "length"
        assert len(choice["logprobs"]["top_logprobs"]) == 5
        assert http.post("/v1/completions", json={"prompt": [1000], "max_tokens": 2}).status_code == 400


@pytest.mark.slow
def test_smollm2_tee_equals_plain(tmp_path, smollm2_plain, smollm2_protected):
    """SmolLM2-135M-Instruct: the session's protected bundles (hard-linked) plus the TEE bundles `stip protect --tee`
    writes, served by a real worker and enclave: 8 greedy tokens equal plain transformers; `stip chat` on the TEE
    client bundle prints them, and refuses the simulated enclave without --allow-simulated."""
    import shutil

    from stip.common import signing
    from stip.common.bundles.manifest import read_manifest
    from stip.developer.tee import write_tee_bundles

    model, tok = smollm2_plain
    out = tmp_path / "protected"
    shutil.copytree(smollm2_protected, out, copy_function=os.link)
    bundle_id = read_manifest(out / "client", verify=False, trusted=[], warn_unpinned=False)["bundle_id"]
    write_tee_bundles(out, bundle_id, signing.load_signing_key(out / "developer" / "signing.key"))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    with tee_stack(out) as (_, enclave):
        g = tee_client(out, enclave).generate(messages=messages, max_tokens=8)
        assert g.prompt_ids == ids and g.token_ids == ref
        chat = [sys.executable, "-m", "stip.cli", "chat", str(out / "tee-client"), "--server", enclave.url,
                "--prompt", messages[0]["content"], "--max-tokens", "8"]
        r = subprocess.run(chat + ["--allow-simulated"], capture_output=True, text=True, timeout=120,
                           env=server_env(CLIENT_TOKEN))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == tok.decode(ref, skip_special_tokens=True).strip()
        r = subprocess.run(chat, capture_output=True, text=True, timeout=120, env=server_env(CLIENT_TOKEN))
        assert r.returncode == 2 and "SIMULATED" in r.stderr and "Traceback" not in r.stderr
