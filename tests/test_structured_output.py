"""Structured output through `stip proxy` (issue 24, item 3): response_format text / json_object / json_schema by
constrained decoding on the client (llguidance), and logit_bias on the un-permuted logits.

Real processes on loopback: `stip serve` (SmolLM2) and `stip proxy`, driven by the official `openai` client; the
top-k downlink's re-requests of full logits are measured with the SDK at a small k.
"""

from __future__ import annotations

import json
import sys

import openai
import pytest
from pydantic import BaseModel, ConfigDict

from stip.server.launch import local_process
from tests.parties import stopped_in_background

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    age: int


@pytest.fixture(scope="module")
def stack(smollm2_protected, smollm2_server):
    """The shared SmolLM2 server (tests/conftest.py) and this module's proxy in front of it."""
    server = smollm2_server
    with stopped_in_background(local_process(
            lambda port: [sys.executable, "-m", "stip.cli", "proxy", str(smollm2_protected / "client"), "--server",
                          server.url, "--port", str(port)], ready_path="/health")) as proxy:
        yield server, proxy


@pytest.fixture(scope="module")
def oai(stack):
    return openai.OpenAI(base_url=stack[1].url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _chat(oai, content: str, **kw):
    return oai.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], temperature=0,
                                       **kw)


def test_json_object_output_parses_as_a_json_object(oai):
    r = _chat(oai, 'Reply with a JSON object with one key "answer": the capital of France.', max_tokens=40,
              response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_json_schema_output_validates_against_the_schema(oai):
    r = _chat(oai, "Describe a person as JSON with a name and an age.", max_tokens=40,
              response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                      "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    Person.model_validate_json(r.choices[0].message.content)  # raises unless it matches
    streamed = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Describe a person as JSON with a name and an age."}],
        temperature=0, max_tokens=40, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}) if c.choices)
    assert streamed == r.choices[0].message.content


def test_response_format_text_is_the_default(oai):
    plain = _chat(oai, "Say hello.", max_tokens=5)
    text = _chat(oai, "Say hello.", max_tokens=5, response_format={"type": "text"})
    assert text.choices[0].message.content == plain.choices[0].message.content


def test_logit_bias_of_100_makes_greedy_pick_that_token(oai, smollm2_protected):
    import stip

    token = stip.ClientBundle.load(smollm2_protected / "client").tokenizer.decode([42])
    plain = oai.completions.create(model="m", prompt="The capital of France is", max_tokens=3, temperature=0)
    r = oai.completions.create(model="m", prompt="The capital of France is", max_tokens=3, temperature=0,
                               logit_bias={"42": 100})
    assert r.choices[0].text == token * 3 != plain.choices[0].text
    chat = _chat(oai, "Say hello.", max_tokens=2, logit_bias={"42": 100})
    assert chat.choices[0].message.content == token * 2


def test_bad_schema_and_logit_bias_keys_get_a_400(oai):
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        _chat(oai, "hi", max_tokens=2, logit_bias={"abc": 1})
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        _chat(oai, "hi", max_tokens=2, response_format={"type": "json_schema"})
    with pytest.raises(openai.BadRequestError, match="cannot be combined with tools"):  # tools: test_clients.py
        _chat(oai, "hi", max_tokens=2, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
              response_format={"type": "json_object"})


def test_top_k_downlink_re_requests_full_logits_when_none_of_the_k_is_allowed(smollm2_protected, stack):
    """At k=2 the grammar often allows none of the k: those steps replay for full logits; the output still matches
    the schema and equals the logits downlink's (greedy). The rate is printed for the report."""
    import stip
    from stip.client.constrained import json_grammar
    from stip.common.sampling import SamplingParams

    msgs = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]
    params = SamplingParams(max_tokens=40, temperature=0, grammar=json_grammar(PERSON))
    exact = stip.Client(smollm2_protected / "client", stack[0].url, downlink="logits").generate(
        messages=msgs, params=params)
    for k in (64, 2):
        gen = stip.Client(smollm2_protected / "client", stack[0].url, k=k).generate(messages=msgs, params=params)
        Person.model_validate_json(gen.text)
        assert gen.text == exact.text
        rate = gen.timing.full_logits_steps / len(gen.token_ids)
        print(f"k={k}: {gen.timing.full_logits_steps} of {len(gen.token_ids)} steps re-requested full logits "
              f"({rate:.0%})")
        if k == 2:
            assert gen.timing.full_logits_steps > 0
