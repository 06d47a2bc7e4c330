"""`stip proxy`'s OpenAI API surface (issue 24): batches and token prompts in /v1/completions, GET /v1/models/{id},
POST /v1/responses, the 404 that lists the routes, OpenAI's error codes, the context window refused up front, any
number of stop strings, the Content-Type check, opt-in CORS, and no U+FFFD where max_tokens cuts a character.

Real processes on loopback: `stip serve` (SmolLM2, --max-seq-len 128: a small context window) and `stip proxy` (an API
key, one CORS origin), driven by the official `openai` client.
"""

from __future__ import annotations

import json
import re
import sys

import httpx
import openai
import pytest

from stip.server.launch import local_process
from tests.parties import serve, stopped_in_background

pytestmark = pytest.mark.slow

KEY = "proxy-key-openai-api"
WINDOW = 128  # the server's --max-seq-len: the context window the proxy enforces
ORIGIN = "http://localhost:3000"
PROMPTS = ["The capital of France is", "Water boils at", "My favourite colour is"]
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def stack(smollm2_protected):
    with serve(smollm2_protected, "--max-seq-len", str(WINDOW)) as server, stopped_in_background(local_process(
            lambda port: [sys.executable, "-m", "stip.cli", "proxy", str(smollm2_protected / "client"), "--server",
                          server.url, "--port", str(port), "--cors-origin", ORIGIN],
            ready_path="/health", env={"STIP_PROXY_API_KEY": KEY})) as proxy:
        yield server, proxy


@pytest.fixture(scope="module")
def oai(stack):
    return openai.OpenAI(base_url=stack[1].url + "/v1", api_key=KEY, max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def tok(smollm2_protected):
    import stip

    return stip.ClientBundle.load(smollm2_protected / "client").tokenizer


def _post(proxy, path: str, body, headers: dict | None = None) -> httpx.Response:
    return httpx.post(proxy.url + path, json=body, headers={**AUTH, **(headers or {})}, timeout=180)


def _greedy(oai, prompt, max_tokens: int = 6):
    return oai.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0)


# ------------------------------------------------------------------ batches and token prompts


def test_a_batch_of_prompts_gets_n_choices_each_indexed_i_times_n_plus_j(oai):
    singles = [_greedy(oai, p) for p in PROMPTS]
    r = oai.completions.create(model="m", prompt=PROMPTS, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == list(range(2 * len(PROMPTS)))
    for i, one in enumerate(singles):
        assert [r.choices[2 * i + j].text for j in range(2)] == [one.choices[0].text] * 2
        assert [r.choices[2 * i + j].finish_reason for j in range(2)] == [one.choices[0].finish_reason] * 2
    assert r.usage.prompt_tokens == sum(one.usage.prompt_tokens for one in singles)  # each prompt counted once
    assert r.usage.completion_tokens == 2 * sum(one.usage.completion_tokens for one in singles)
    texts, finished, usage = {}, {}, None
    for chunk in oai.completions.create(model="m", prompt=PROMPTS, max_tokens=6, temperature=0, n=2, stream=True,
                                        stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finished[c.index] = c.finish_reason
    assert [texts[i] for i in range(6)] == [c.text for c in r.choices]
    assert [finished[i] for i in range(6)] == [c.finish_reason for c in r.choices]
    assert usage.prompt_tokens == r.usage.prompt_tokens and usage.completion_tokens == r.usage.completion_tokens
    echoed = oai.completions.create(model="m", prompt=PROMPTS[:2], max_tokens=1, temperature=0, echo=True)
    assert [c.text[:len(p)] for c, p in zip(echoed.choices, PROMPTS)] == PROMPTS[:2]


def test_token_id_prompts_one_or_a_batch_answer_as_their_text(oai, tok):
    ids = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    texts = [_greedy(oai, p).choices[0].text for p in PROMPTS[:2]]
    assert _greedy(oai, ids[0]).choices[0].text == texts[0]
    assert [c.text for c in _greedy(oai, ids).choices] == texts
    with pytest.raises(openai.BadRequestError, match=r"prompt\[1\]: token ids must be in") as e:
        _greedy(oai, [ids[0], [10**9]])
    assert e.value.code == "invalid_value"


def _sessions_active(server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return sum(float(v) for v in re.findall(r"^stip_sessions_active(?:\{[^}]*\})? (\S+)$", text, re.M))


def test_the_prompts_of_a_batch_run_concurrently(stack):
    """The streamed answer's 200 comes once every prompt's session is open and prefilled: they are open together."""
    server, proxy = stack
    body = {"model": "m", "prompt": PROMPTS, "max_tokens": 48, "temperature": 0, "stream": True}
    with httpx.stream("POST", proxy.url + "/v1/completions", json=body, headers=AUTH, timeout=180) as r:
        assert r.status_code == 200
        seen = max(_sessions_active(server) for _ in range(3))
        r.read()
    assert seen >= len(PROMPTS)
    assert r.text.rstrip().endswith("data: [DONE]")


# ------------------------------------------------------------------ routes


def test_a_model_by_id_and_an_unknown_one(oai):
    model_id = oai.models.list().data[0].id
    assert oai.models.retrieve(model_id).id == model_id
    with pytest.raises(openai.NotFoundError, match="gpt-4o") as e:
        oai.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found" and e.value.type == "invalid_request_error"


def test_a_route_not_served_gets_a_404_naming_it_and_listing_the_routes(oai, stack):
    _, proxy = stack
    with pytest.raises(openai.NotFoundError, match=r"GET /v1/files") as e:
        oai.files.list()
    for route in ("GET /v1/models", "POST /v1/chat/completions", "POST /v1/completions", "POST /v1/responses"):
        assert route in e.value.message
    r = httpx.get(proxy.url + "/v1/completions", headers=AUTH)
    assert r.status_code == 405 and "GET /v1/completions" in r.json()["error"]["message"]


# ------------------------------------------------------------------ the Responses API

INSTRUCTIONS = "Answer in one short sentence."
QUESTION = "What colour is the sky?"


def test_responses_text_in_text_out_whole_and_streamed(oai):
    chat = oai.chat.completions.create(model="m", messages=[{"role": "system", "content": INSTRUCTIONS},
                                                            {"role": "user", "content": QUESTION}],
                                       max_tokens=8, temperature=0)
    kw = dict(model="m", instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=8, temperature=0)
    r = oai.responses.create(**kw)
    assert r.output_text == chat.choices[0].message.content
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    assert r.output[0].role == "assistant" and r.object == "response"
    items = oai.responses.create(model="m", max_output_tokens=8, temperature=0, input=[
        {"role": "developer", "content": INSTRUCTIONS},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]}])
    assert items.output_text == r.output_text
    events = list(oai.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{r.status}"]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == r.output_text and len(deltas) >= 2
    assert events[-1].response.output_text == r.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))


@pytest.mark.parametrize("extra,named", [
    ({"previous_response_id": "resp_1"}, "stores no responses"),
    ({"tools": [{"type": "function", "name": "f"}]}, "tool calling"),
    ({"text": {"format": {"type": "json_object"}}}, "plain text"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "function_call_output"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]}, "input_image"),
])
def test_responses_refuse_what_they_cannot_do(oai, extra, named):
    with pytest.raises(openai.BadRequestError, match=named):
        oai.responses.create(**{"model": "m", "input": QUESTION, **extra})


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("method,path,body,headers,status,code", [
    ("POST", "/v1/completions", {"prompt": "hi"}, {"Authorization": "Bearer wrong"}, 401, "invalid_api_key"),
    ("GET", "/v1/models/nope", None, {}, 404, "model_not_found"),
    ("POST", "/v1/completions", {"prompt": "hi", "suffix": "x"}, {}, 400, "unsupported_parameter"),
    ("POST", "/v1/completions", {"prompt": "hi", "frobnicate": 1}, {}, 400, "unknown_parameter"),
    ("POST", "/v1/completions", {"prompt": "hi", "temperature": 9}, {}, 400, "invalid_value"),
    ("POST", "/v1/chat/completions", {}, {}, 400, "missing_required_parameter"),
    ("POST", "/v1/completions", {"prompt": [1] * WINDOW}, {}, 400, "context_length_exceeded"),
    ("POST", "/v1/embeddings", {"input": "hi"}, {}, 400, None),
    ("DELETE", "/v1/nothing", None, {}, 404, "unknown_url"),
])
def test_every_error_has_openais_shape_and_code(stack, method, path, body, headers, status, code):
    _, proxy = stack
    r = httpx.request(method, proxy.url + path, json=body, headers={**AUTH, **headers}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["code"] == code


def test_prompt_plus_max_tokens_over_the_window_is_refused_up_front(oai, stack):
    prompt = [1000] * (WINDOW - 8)
    with pytest.raises(openai.BadRequestError, match=f"maximum context length is {WINDOW} tokens") as e:
        oai.completions.create(model="m", prompt=prompt, max_tokens=9)
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"
    assert f"{WINDOW - 8} in the prompt, 9 in the completion" in e.value.message
    fits = oai.completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0)
    assert fits.choices[0].finish_reason in ("stop", "length") and fits.usage.completion_tokens <= 8
    with pytest.raises(openai.BadRequestError, match=r"prompt\[1\]") as e:
        oai.completions.create(model="m", prompt=[[1000] * 4, prompt], max_tokens=9)
    assert e.value.code == "context_length_exceeded"
    # chat without max_tokens: the default shrinks to the room left; a prompt that fills the window is refused
    long = " ".join(["word"] * (WINDOW - 50))
    r = oai.chat.completions.create(model="m", messages=[{"role": "user", "content": long}], temperature=0)
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= WINDOW
    with pytest.raises(openai.BadRequestError, match="maximum context length") as e:
        oai.chat.completions.create(model="m", messages=[{"role": "user", "content": long * 2}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        oai.responses.create(model="m", input=QUESTION, max_output_tokens=WINDOW)


def test_more_than_four_stop_strings(oai):
    text = _greedy(oai, PROMPTS[0], 12).choices[0].text
    stop = text[4:8]
    r = oai.completions.create(model="m", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                               stop=["zq1", "zq2", "zq3", "zq4", "zq5", stop])
    assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"


def test_a_body_not_sent_as_json_is_refused_saying_so(stack):
    _, proxy = stack
    body = json.dumps({"prompt": "hi", "max_tokens": 1})
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded"):
        headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
        r = httpx.post(proxy.url + "/v1/completions", content=body, headers=headers, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert "Content-Type: application/json" in error["message"] and error["code"] == "invalid_content_type"
    r = httpx.post(proxy.url + "/v1/completions", content=body, timeout=60,
                   headers={**AUTH, "Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------ CORS


def test_cors_answers_the_named_origin_only(stack):
    _, proxy = stack
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, "
                 "content-type"}
    r = httpx.options(proxy.url + "/v1/chat/completions", headers={"Origin": ORIGIN, **preflight})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = _post(proxy, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, {"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(proxy.url + "/v1/models", headers={"Origin": ORIGIN})  # no key: the page can read the 401
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN
    other = "http://evil.example"
    assert "access-control-allow-origin" not in httpx.options(proxy.url + "/v1/models",
                                                              headers={"Origin": other, **preflight}).headers
    assert "access-control-allow-origin" not in httpx.get(proxy.url + "/v1/models",
                                                          headers={"Origin": other, **AUTH}).headers


def test_cors_is_off_by_default_and_star_needs_a_key(stack, smollm2_protected):
    from fastapi.testclient import TestClient

    from stip.client.proxy import create_app
    from stip.client.proxy_guard import check_cors
    from stip.client.sdk import Client
    from stip.errors import StipError

    server, _ = stack
    app = create_app(Client(smollm2_protected / "client", server.url))
    with TestClient(app, base_url="http://localhost") as http:
        r = http.options("/v1/models", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in r.headers
        r = http.get("/v1/models", headers={"Origin": ORIGIN})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    with pytest.raises(StipError, match="needs --api-key"):
        check_cors(["*"], None)
    check_cors(["*", "https://app.example:8443", "http://[::1]:3000"], KEY)
    with pytest.raises(StipError, match="scheme://host"):
        check_cors(["http://localhost:3000/path"], KEY)


# ------------------------------------------------------------------ a cut inside a character


def test_a_cut_inside_a_multibyte_character_holds_its_bytes_back(oai):
    """SmolLM2 writes 🎉 as three byte tokens: max_tokens=4 after the prompt ends one token into the second 🎉.
    The partial bytes are held back (as mid-stream), not shown as U+FFFD."""
    kw = dict(model="m", prompt="Emoji party: 🎉🎉🎉🎉🎉🎉", temperature=0, max_tokens=4, logprobs=0)
    r = oai.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 4
    assert "\ufffd" in choice.logprobs.tokens[-1]  # the last token is part of a character
    assert choice.text and "\ufffd" not in choice.text
    assert _greedy(oai, kw["prompt"], 6).choices[0].text.startswith(choice.text)
    streamed = "".join(c.choices[0].text for c in oai.completions.create(stream=True, **kw) if c.choices)
    assert streamed == choice.text
