"""`stip proxy` safety and OpenAI parameters, as real processes on tiny models: `stip serve` and `stip proxy`
subprocesses on loopback, driven by httpx and the official `openai` client.

Tiny bundles have no tokenizer, so completions take token ids and logprobs show tokens as `token_id:N`.
"""

from __future__ import annotations

import ssl
import subprocess
import sys

import httpx
import openai
import pytest
import torch

from stip.client.sdk import Client
from stip.client.proxy_guard import check_listen
from stip.client.transport import Connection, StipServerError
from stip.errors import StipError
from stip.server.launch import local_process, server_env
from tests.parties import serve, stopped_in_background
from tests.test_tls import pki  # noqa: F401 - a fixture: a throwaway CA and a certificate for 127.0.0.1

KEY = "proxy-key-for-tests"
PROMPT = [5, 17, 3, 88, 42, 9, 61, 23]
K = 4  # the proxy's top-k downlink


def _proxy(bundle, server_url: str, *args: str, api_key: str | None = None):
    env = {"STIP_PROXY_API_KEY": api_key} if api_key else {}
    return stopped_in_background(local_process(
        lambda port: [sys.executable, "-m", "stip.cli", "proxy", str(bundle), "--server", server_url, "--port",
                      str(port), *args], ready_path="/health", env=env))


@pytest.fixture(scope="module")
def tiny(tiny_protected):
    return tiny_protected("llama-gqa-untied")


@pytest.fixture(scope="module")
def stack(tiny):
    """A tiny server and, in front of it, a proxy with an API key (from STIP_PROXY_API_KEY) and k=4."""
    _, protected = tiny
    with serve(protected) as server, _proxy(protected / "client", server.url, "--k", str(K),
                                            api_key=KEY) as proxy:
        yield server, proxy


def _post(proxy, path: str, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(proxy.url + path, json=body, headers=headers, timeout=60)


def _token_ids(choice_logprobs: dict) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in choice_logprobs["tokens"]]


# ------------------------------------------------------------------ binding and the API key


def _run_proxy_cli(bundle, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stip.cli", "proxy", str(bundle), *args], capture_output=True,
                          text=True, timeout=120, env=server_env(None, {"STIP_PROXY_API_KEY": "", **(env or {})}))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "proxy.example"])
def test_non_loopback_bind_without_a_key_is_refused(tiny, host):
    _, protected = tiny
    r = _run_proxy_cli(protected / "client", "--host", host, "--server", "http://127.0.0.1:9")
    assert r.returncode == 2, r.stderr
    assert f"refusing to listen on {host}" in r.stderr and "--api-key" in r.stderr
    assert "Traceback" not in r.stderr


def test_non_loopback_bind_with_a_key_needs_tls(tiny, pki):
    """With a key but no TLS, off loopback, the key and the prompts would cross the network in clear text: refused.
    With a key and TLS the bind rules pass; the run then stops at the (absent) server, before binding anything."""
    _, protected = tiny
    args = (protected / "client", "--host", "0.0.0.0", "--server", "http://127.0.0.1:9")
    r = _run_proxy_cli(*args, env={"STIP_PROXY_API_KEY": KEY})
    assert r.returncode == 2 and "refusing to listen on 0.0.0.0 without TLS" in r.stderr, r.stderr
    assert "--ssl-certfile" in r.stderr and "Traceback" not in r.stderr and KEY not in r.stderr + r.stdout
    with pytest.raises(StipError, match="--ssl-certfile and --ssl-keyfile go together"):
        check_listen("0.0.0.0", KEY, pki["cert"], None)
    with pytest.raises(StipError, match="cannot serve TLS"):  # a key that is not the certificate's
        check_listen("0.0.0.0", KEY, pki["cert"], pki["other_ca"])
    r = _run_proxy_cli(*args, "--ssl-certfile", str(pki["cert"]), "--ssl-keyfile", str(pki["key"]),
                       env={"STIP_PROXY_API_KEY": KEY})
    assert r.returncode == 2 and "refusing" not in r.stderr and "cannot reach" in r.stderr, r.stderr
    assert KEY not in r.stderr + r.stdout


def test_a_keyed_proxy_off_loopback_serves_https(stack, tiny, pki):
    """Bound to 0.0.0.0 with a key and TLS: the OpenAI client talks https to it (verified against the test CA);
    plain http to the same port gets no answer."""
    server, _ = stack
    _, protected = tiny
    with stopped_in_background(local_process(
            lambda port: [sys.executable, "-m", "stip.cli", "proxy", str(protected / "client"), "--server",
                          server.url, "--host", "0.0.0.0", "--port", str(port), "--ssl-certfile", str(pki["cert"]),
                          "--ssl-keyfile", str(pki["key"])],
            env={"STIP_PROXY_API_KEY": KEY}, ca_file=pki["ca"])) as proxy:
        assert proxy.url.startswith("https://")
        with httpx.Client(verify=ssl.create_default_context(cafile=str(pki["ca"]))) as verified:
            oai = openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEY, max_retries=0, http_client=verified)
            r = oai.completions.create(model="m", prompt=PROMPT, max_tokens=2, temperature=0)
        assert r.usage.completion_tokens >= 1
        with pytest.raises(httpx.HTTPError):
            httpx.get(proxy.url.replace("https://", "http://") + "/health", timeout=10)


@pytest.fixture(scope="module")
def keyless(stack, tiny):
    """A proxy without a key (loopback only) in front of the module's server; `proxy.test` is an --allowed-host."""
    server, _ = stack
    _, protected = tiny
    with _proxy(protected / "client", server.url, "--allowed-host", "proxy.test") as proxy:
        yield proxy


def test_keyless_proxy_refuses_a_foreign_host_header(keyless):
    """DNS rebinding: a page at evil.example re-points its name at 127.0.0.1 and the browser lets it read the
    answers; but its requests name evil.example as their Host, and the key-less proxy refuses them, before any
    generation. Loopback names at the bound port, and the operator's --allowed-host, are answered."""
    proxy = keyless
    port = proxy.port
    for host in ("evil.example", f"evil.example:{port}", f"localhost:{port + 1}", f"127.0.0.1.nip.io:{port}",
                 f"localhost.:{port}", f"user@localhost:{port}"):
        r = httpx.post(proxy.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2},
                       headers={"Host": host})
        assert r.status_code == 400, (host, r.text)
        err = r.json()["error"]
        assert "DNS rebinding" in err["message"] and "--allowed-host" in err["message"], err
        assert httpx.get(proxy.url + "/health", headers={"Host": host}).status_code == 400
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"LocalHost:{port}",
                 f"proxy.test:{port}"):
        assert httpx.get(proxy.url + "/v1/models", headers={"Host": host}).status_code == 200, host
    oai = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    assert oai.completions.create(model="m", prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1
    assert "Traceback" not in proxy.log()


def test_v1_needs_the_key(stack):
    _, proxy = stack
    for key, why in [(None, "no API key"), ("wrong", "incorrect API key"), (KEY + "x", "incorrect API key")]:
        r = httpx.get(proxy.url + "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
        assert r.status_code == 401 and why in r.json()["error"]["message"], r.text
        assert _post(proxy, "/v1/completions", {"prompt": PROMPT}, key).status_code == 401
    assert httpx.get(proxy.url + "/health").json() == {"status": "ok"}  # no key, and nothing to learn
    assert httpx.get(proxy.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=proxy.url + "/v1", api_key="wrong", max_retries=0).models.list()
    oai = openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEY, max_retries=0)
    assert oai.models.list().data[0].id
    assert KEY not in proxy.log()


# ------------------------------------------------------------------ the parameter allow-list


@pytest.mark.parametrize("extra,named,why", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tool calling"),
    ({"response_format": {"type": "json_object"}}, "response_format", "unknown parameter"),  # chat only
    ({"prediction": {"type": "content", "content": "x"}}, "prediction", "predicted outputs"),
    ({"suffix": "end"}, "suffix", "suffix"),
    ({"best_of": 3}, "best_of", "use n"),
    ({"some_future_field": 1}, "some_future_field", "unknown parameter"),
])
def test_unsupported_parameters_get_a_400_naming_them(stack, extra, named, why):
    _, proxy = stack
    r = _post(proxy, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == named and named in err["message"] and why in err["message"]


def test_every_unsupported_parameter_is_named_and_null_means_absent(stack):
    _, proxy = stack
    r = _post(proxy, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                              "functions": [{"name": "f"}], "prediction": {"x": 2}, "foo": 1})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert all(name in msg for name in ("functions", "prediction", "foo"))
    r = _post(proxy, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "refusal": "no"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].refusal"
    # sent as null (or the neutral value), a listed parameter is "not used"; user/metadata-style fields are accepted
    r = _post(proxy, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "tools": None, "logit_bias": None,
                                         "suffix": None, "best_of": 1, "user": "u",
                                         "stream_options": None})
    assert r.status_code == 200, r.text
    with pytest.raises(openai.BadRequestError, match="response_format"):
        openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEY, max_retries=0).completions.create(
            model="m", prompt=PROMPT, max_tokens=2, extra_body={"response_format": {"type": "json_object"}})


@pytest.mark.parametrize("body,param", [
    ({"logprobs": 6}, "logprobs"),  # OpenAI's limit for completions is 5
    ({"logprobs": 5}, "logprobs"),  # more than the proxy's k=4
    ({"n": 17}, "n"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
])
def test_bad_values_get_a_400_naming_them(stack, body, param):
    _, proxy = stack
    r = _post(proxy, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_echo_with_logprobs_scores_a_prompt_of_token_ids(stack):
    """A bundle without a tokenizer echoes its prompt as `token_id:N` pieces, the text its logprobs name."""
    _, proxy = stack
    r = _post(proxy, "/v1/completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert _token_ids(lp) == list(PROMPT) and lp["token_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:])
    assert choice["text"] == "".join(lp["tokens"])


# ------------------------------------------------------------------ logprobs, n, penalties


def test_completion_logprobs_are_the_models_log_softmax(stack, tiny):
    from transformers import AutoModelForCausalLM

    plain, _ = tiny
    _, proxy = stack
    r = _post(proxy, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 3})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    ids = _token_ids(lp)
    model = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + ids])).logits[0, len(PROMPT) - 1:-1]
    ref = torch.log_softmax(logits.float(), -1)
    assert ids == ref.argmax(-1).tolist()  # greedy
    for i, t in enumerate(ids):
        assert abs(lp["token_logprobs"][i] - float(ref[i, t])) < 1e-4
        values, top = torch.topk(ref[i], 3)
        assert list(lp["top_logprobs"][i]) == [f"token_id:{x}" for x in top.tolist()]
        torch.testing.assert_close(torch.tensor(list(lp["top_logprobs"][i].values())), values, atol=1e-4, rtol=0)


def test_n_choices_use_seed_plus_i_and_stream_with_their_index(stack, tiny):
    server, proxy = stack
    _, protected = tiny
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 7, "n": 3, "logprobs": 0,
            "presence_penalty": 0.7, "frequency_penalty": 0.4}
    r = _post(proxy, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    client = Client(protected / "client", server.url, k=K)
    expected = []
    for i in range(3):
        g = client.generate(ids=PROMPT, max_tokens=6, temperature=1.0, seed=7 + i, presence_penalty=0.7,
                            frequency_penalty=0.4)
        expected.append([t for t in g.token_ids if t not in client.bundle.eos_token_ids])
    assert [_token_ids(c["logprobs"]) for c in choices] == expected
    assert r.json()["usage"]["completion_tokens"] == sum(
        len(client.generate(ids=PROMPT, max_tokens=6, temperature=1.0, seed=7 + i, presence_penalty=0.7,
                            frequency_penalty=0.4).token_ids) for i in range(3))
    # streamed: every choice's chunks carry its index and end with its finish_reason
    oai = openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEY, max_retries=0)
    chunks = list(oai.completions.create(model="m", stream=True, **body))
    streamed = {i: [] for i in range(3)}
    for c in chunks:
        for ch in c.choices:
            if ch.logprobs:
                streamed[ch.index] += [int(t.removeprefix("token_id:")) for t in ch.logprobs.tokens]
    assert [streamed[i] for i in range(3)] == expected
    assert sorted(ch.index for c in chunks for ch in c.choices if ch.finish_reason) == [0, 1, 2]


# ------------------------------------------------------------------ upstream refusals keep their status


@pytest.fixture(scope="module", params=["client-quota", "server-full"])
def limited(tiny, tmp_path_factory, request):
    """A server the proxy's STIP client can hold one session on, at most: a per-client quota of 1 (the server answers
    429) or a server-wide limit of 1 (503). Yields (server, proxy, hold) where hold() opens that one session."""
    _, protected = tiny
    if request.param == "client-quota":
        keys = tmp_path_factory.mktemp("keys") / "apikeys.json"
        out = subprocess.run([sys.executable, "-m", "stip.cli", "apikey", "create", str(keys), "proxy",
                              "--max-sessions", "1"], capture_output=True, text=True, check=True)
        token, args = out.stdout.split()[0], ("--api-keys", str(keys))
    else:
        token, args = None, ("--max-sessions", "1")
    with serve(protected, *args) as server, stopped_in_background(local_process(
            lambda port: [sys.executable, "-m", "stip.cli", "proxy", str(protected / "client"), "--server",
                          server.url, "--port", str(port)], ready_path="/health", token=token)) as proxy:
        yield server, proxy, lambda: Connection(server.url, token=token).open_session(), request.param


def test_a_streaming_request_gets_the_upstream_status_not_a_200(limited):
    """The proxy opens the server session before its 200: the server's refusal is the HTTP status (429 for a client
    over its quota, 503 for a full server), with OpenAI's error body and Retry-After, so the openai SDK can retry."""
    server, proxy, hold, kind = limited
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 4, "stream": True}
    held = hold()
    try:
        with pytest.raises(StipServerError) as upstream:
            hold()
        status = upstream.value.status
        assert status == (429 if kind == "client-quota" else 503)
        with httpx.stream("POST", proxy.url + "/v1/completions", json=body, timeout=60) as r:
            r.read()
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/json") and r.headers["retry-after"]
        assert r.json()["error"]["type"] == ("rate_limit_error" if status == 429 else "server_error")
        oai = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        error = openai.RateLimitError if status == 429 else openai.InternalServerError
        with pytest.raises(error):
            oai.completions.create(model="m", prompt=PROMPT, max_tokens=4, stream=True)
        with pytest.raises(error):
            oai.completions.create(model="m", prompt=PROMPT, max_tokens=4)
    finally:
        held.close()
    # the session freed, the same request streams
    with httpx.stream("POST", proxy.url + "/v1/completions", json=body, timeout=60) as r:
        text = r.read().decode()
    assert r.status_code == 200 and text.rstrip().endswith("data: [DONE]")


def test_openai_client_retries_until_the_server_has_room(limited):
    server, proxy, hold, _ = limited
    held = hold()
    statuses: list[int] = []

    def answered(response: httpx.Response) -> None:  # each of the SDK's attempts, as its status comes back
        statuses.append(response.status_code)
        if len(statuses) == 1:
            held.close()  # the holder finishes once the client was refused, while the SDK waits out Retry-After

    oai = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=3,
                        http_client=httpx.Client(event_hooks={"response": [answered]}))
    chunks = list(oai.completions.create(model="m", prompt=PROMPT, max_tokens=4, stream=True, logprobs=1,
                                         temperature=0))  # greedy: a sampled first token could be EOS (none shown)
    assert statuses[-1] == 200 and len(statuses) >= 2 and set(statuses[:-1]) <= {429, 503}, statuses  # it waited
    assert sum(len(ch.logprobs.tokens) for c in chunks for ch in c.choices if ch.logprobs) >= 1
