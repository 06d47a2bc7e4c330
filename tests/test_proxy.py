"""`stip proxy` as a subprocess in front of a `stip serve` subprocess; the official `openai` client talks to it."""

from __future__ import annotations

import sys

import httpx
import openai
import pytest

from stip.reference import plain_greedy
from stip.server.launch import local_process
from tests.parties import stopped_in_background

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Explain how photosynthesis works, step by step."}]
PROMPT = "The three most important inventions in history are"
N = 32


@pytest.fixture(scope="module")
def proxy_url(smollm2_protected, smollm2_server):
    """This module's `stip proxy` in front of the session's default SmolLM2 server (tests/conftest.py)."""
    server = smollm2_server
    with stopped_in_background(local_process(
            lambda port: [sys.executable, "-m", "stip.cli", "proxy", str(smollm2_protected / "client"), "--server",
                          server.url, "--port", str(port)], ready_path="/v1/models")) as proxy:
        yield proxy.url


@pytest.fixture(scope="module")
def oai(proxy_url):
    return openai.OpenAI(base_url=proxy_url + "/v1", api_key="anything", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def expected(smollm2_plain):
    model, tok = smollm2_plain
    eos = [tok.convert_tokens_to_ids("<|im_end|>")]
    chat_ids = tok(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
    chat = plain_greedy(model, chat_ids, N, eos)
    comp = plain_greedy(model, tok(PROMPT)["input_ids"], N, eos)
    return {"chat": tok.decode(chat, skip_special_tokens=True), "chat_tokens": len(chat),
            "completion": tok.decode(comp, skip_special_tokens=True), "prompt_tokens": len(chat_ids)}


def test_models(oai):
    models = oai.models.list().data
    assert len(models) == 1 and models[0].id


def test_chat_non_streaming(oai, expected):
    r = oai.chat.completions.create(model="anything", messages=CHAT, temperature=0, max_tokens=N)
    assert r.choices[0].message.content == expected["chat"]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == expected["chat_tokens"]
    assert r.usage.prompt_tokens == expected["prompt_tokens"]


def test_chat_streaming(oai, expected):
    chunks = list(oai.chat.completions.create(model="m", messages=CHAT, temperature=0, max_tokens=N, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["chat"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 10  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == expected["chat_tokens"]


def test_completions(oai, expected):
    r = oai.completions.create(model="m", prompt=PROMPT, temperature=0, max_tokens=N)
    assert r.choices[0].text == expected["completion"]
    stream = oai.completions.create(model="m", prompt=PROMPT, temperature=0, max_tokens=N, stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected["completion"]


def test_stop_seed_and_harmless_fields(oai, expected):
    text = expected["chat"]
    stop = text[len(text) // 2:len(text) // 2 + 5]
    r = oai.chat.completions.create(model="m", messages=CHAT, temperature=0, max_tokens=N, stop=[stop],
                                    frequency_penalty=0.0, user="u", metadata={"k": "v"}, store=False)
    assert r.choices[0].message.content == text[:text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    kw = dict(model="m", messages=[{"role": "user", "content": "Tell me a joke."}], max_tokens=12, temperature=1.0,
              top_p=0.9, seed=3)
    a = oai.chat.completions.create(**kw).choices[0].message.content
    assert a == oai.chat.completions.create(**kw).choices[0].message.content


@pytest.mark.parametrize("body", [
    {"messages": CHAT, "n": 17},
    {"messages": CHAT, "some_future_field": 1},
    {"messages": CHAT, "tool_choice": "required"},  # no tools to call
    {"messages": CHAT, "top_logprobs": 2},
    {"messages": CHAT, "logprobs": True, "top_logprobs": 21},
    {"messages": [{"role": "tool", "content": "x"}]},
    {"messages": CHAT, "temperature": 3.5},
    {"messages": CHAT, "top_p": 0},
    {"messages": CHAT, "max_tokens": 0},
    {"messages": []},
    {},
    {"messages": "hello"},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
])
def test_bad_chat_requests_get_400(proxy_url, body):
    r = httpx.post(proxy_url + "/v1/chat/completions", json={"model": "m", **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


def test_bad_requests_via_openai_client_and_raw(oai, proxy_url):
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        oai.chat.completions.create(model="m", messages=CHAT, tools=[{"type": "function", "function": {"name": "f"}}],
                                    tool_choice={"type": "function", "function": {"name": "g"}})
    with pytest.raises(openai.BadRequestError, match="predicted outputs"):
        oai.chat.completions.create(model="m", messages=CHAT, prediction={"type": "content", "content": "x"})
    with pytest.raises(openai.BadRequestError, match="prompt is empty"):
        oai.completions.create(model="m", prompt=[], max_tokens=2)
    r = httpx.post(proxy_url + "/v1/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(proxy_url + "/v1/completions", json={"prompt": [10**9]}, timeout=30)
    assert r.status_code == 400
    assert httpx.get(proxy_url + "/v1/nothing", timeout=30).status_code == 404


def test_chat_logprobs_are_the_models_log_softmax(oai, smollm2_plain):
    model, tok = smollm2_plain
    r = oai.chat.completions.create(model="m", messages=CHAT, temperature=0, max_tokens=12, logprobs=True,
                                    top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert b"".join(bytes(c.bytes) for c in content).decode() == r.choices[0].message.content
    prompt = tok(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    ids = plain_greedy(model, prompt, 12, [tok.convert_tokens_to_ids("<|im_end|>")])
    import torch

    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float(), -1)
    assert len(content) == len(ids)
    for i, c in enumerate(content):
        assert abs(c.logprob - float(ref[i, ids[i]])) < 1e-3
        values, top = torch.topk(ref[i], 3)
        assert [bytes(t.bytes) for t in c.top_logprobs] == [tok.decode([x]).encode() for x in top.tolist()]
        assert max(abs(t.logprob - float(v)) for t, v in zip(c.top_logprobs, values)) < 1e-3


def test_n_streamed_choices_interleave_and_match_the_whole_ones(oai):
    kw = dict(model="m", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=1.0,
              seed=11, n=2)
    whole = oai.chat.completions.create(**kw)
    assert [c.index for c in whole.choices] == [0, 1]
    assert whole.usage.completion_tokens >= 2
    texts, order = {0: "", 1: ""}, []
    for chunk in oai.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            order.append(c.index)
    assert [texts[0], texts[1]] == [c.message.content for c in whole.choices]
    assert set(order) == {0, 1}


def test_embeddings_on_a_decoder_bundle_are_refused_naming_its_task(oai):
    with pytest.raises(openai.BadRequestError, match="text-generation"):
        oai.embeddings.create(model="m", input="hi")
