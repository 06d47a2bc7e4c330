"""Real client libraries against `stip proxy` (issue 24, "must show"): the openai SDK (function calling, `.parse`),
langchain-openai (invoke, stream, batch, with_structured_output, bind_tools), instructor (TOOLS and JSON modes) and
EleutherAI's lm-evaluation-harness (local-completions multiple_choice, local-chat-completions generate_until) on a
ten-question task shipped in tests/fixtures/lm_eval, offline.

Lossless through lm-eval: the multiple-choice task's per-item log-likelihoods through the proxy equal lm-eval's `hf`
backend on the plain SmolLM2 within 1e-4, and the accuracy is identical.

One `stip serve` (SmolLM2, protected: the session's default server, tests/conftest.py) and one `stip proxy` for the
whole file, real processes on loopback.
"""

from __future__ import annotations

import json
import sys

import openai
import pytest
from pydantic import BaseModel

from stip.server.launch import local_process
from tests.parties import stopped_in_background

pytestmark = pytest.mark.slow

LM_EVAL_TASKS = "tests/fixtures/lm_eval"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}  # no parameters
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# a call and its result in the history, then a question of the same kind: the model calls the tool again
HISTORY = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"},
    {"role": "assistant", "content": "It is sunny in Paris, 24 C."},
    {"role": "user", "content": "What is the weather in London?"}]


class Person(BaseModel):
    name: str
    age: int


def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return "sunny"


@pytest.fixture(scope="module")
def stack(smollm2_protected, smollm2_server):
    """The session's default SmolLM2 `stip serve` (tests/conftest.py `smollm2_server`) and this module's proxy."""
    server = smollm2_server
    with stopped_in_background(local_process(
            lambda port: [sys.executable, "-m", "stip.cli", "proxy", str(smollm2_protected / "client"), "--server",
                          server.url, "--port", str(port)], ready_path="/health")) as proxy:
        yield server, proxy


@pytest.fixture(scope="module")
def base_url(stack):
    return stack[1].url + "/v1"


@pytest.fixture(scope="module")
def oai(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)


def _tools(oai, messages=ASK, **kw):
    return oai.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=40, **kw).choices[0]


# ------------------------------------------------------------------ openai: function calling


def test_openai_required_and_named_tool_choice_return_a_call(oai):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        c = _tools(oai, tools=[WEATHER, TIME], tool_choice=choice)
        assert c.finish_reason == "tool_calls" and c.message.content is None
        (call,) = c.message.tool_calls
        assert call.id.startswith("call_") and call.type == "function"
        if choice != "required":
            assert call.function.name == "get_weather"
        args = json.loads(call.function.arguments)
        assert set(args) == ({"city"} if call.function.name == "get_weather" else set())
    c = _tools(oai, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert c.message.tool_calls[0].function.name == "get_time"
    assert json.loads(c.message.tool_calls[0].function.arguments) == {}


def test_openai_auto_calls_or_answers_and_none_answers(oai):
    """auto: a call where the history shows the way (a tool_calls message and a tool result, rendered for a template
    without a tool format), text where the model starts with text; none: text."""
    c = _tools(oai, HISTORY, tools=[WEATHER])  # auto is the default with tools
    assert c.finish_reason == "tool_calls"
    assert json.loads(c.message.tool_calls[0].function.arguments) == {"city": "London"}
    c = _tools(oai, tools=[WEATHER], tool_choice="auto")
    assert c.message.tool_calls is None and c.message.content and not c.message.content.startswith("{")
    c = _tools(oai, HISTORY, tools=[WEATHER], tool_choice="none")
    assert c.message.tool_calls is None and c.finish_reason in ("stop", "length")


def test_openai_tool_call_streams_as_openai_streams_it(oai):
    whole = _tools(oai, tools=[WEATHER], tool_choice="required").message.tool_calls[0]
    chunks = [ch for ch in oai.chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=40,
                                                       tools=[WEATHER], tool_choice="required", stream=True)]
    calls = [ch.choices[0].delta.tool_calls[0] for ch in chunks if ch.choices[0].delta.tool_calls]
    assert calls[0].id.startswith("call_") and calls[0].function.name == "get_weather"
    assert all(c.index == 0 and c.id is None and c.function.name is None for c in calls[1:])
    assert len(calls) >= 2 and "".join(c.function.arguments for c in calls) == whole.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    with oai.chat.completions.stream(model="m", messages=ASK, temperature=0, max_tokens=40, tools=[WEATHER],
                                     tool_choice="required") as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.arguments == whole.function.arguments


def test_openai_parse_with_a_pydantic_response_format_and_a_strict_function_tool(oai):
    r = oai.chat.completions.parse(model="m", messages=[{"role": "user", "content": "Describe a person as JSON."}],
                                   response_format=Person, temperature=0, max_tokens=40)
    assert isinstance(r.choices[0].message.parsed, Person)
    r = oai.chat.completions.parse(model="m", messages=[{"role": "user", "content": "Describe a person."}],
                                   tools=[openai.pydantic_function_tool(Person)], tool_choice="required",
                                   temperature=0, max_tokens=40)
    assert isinstance(r.choices[0].message.tool_calls[0].function.parsed_arguments, Person)


@pytest.mark.parametrize("extra,match", [
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tools": [WEATHER, WEATHER]}, "two tools are named"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "cannot be combined with tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"functions": [{"name": "f"}]}, "use tools"),
    ({"messages": [{"role": "tool", "content": "sunny"}]}, "tool_call_id"),
])
def test_bad_tool_requests_get_a_400(oai, extra, match):
    extra = dict(extra)
    with pytest.raises(openai.BadRequestError, match=match):
        oai.chat.completions.create(model="m", messages=extra.pop("messages", ASK), max_tokens=4, extra_body=extra)


def test_a_chat_template_with_a_tool_format_gets_the_tools_and_the_calls(smollm2_protected):
    """Where the template reads `tools` (transformers' apply_chat_template(tools=...)), the tools and earlier calls
    go to it as such, with no system instruction; SmolLM2's template has no tool format."""
    import stip
    from stip.client.proxy_requests import ChatRequest
    from stip.client.proxy_tools import ToolUse, chat_messages, takes_tools

    tok = stip.ClientBundle.load(smollm2_protected / "client").tokenizer
    assert not takes_tools(tok)
    template = ("{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}{% for m in messages %}"
                "<|im_start|>{{ m.role }}\n{% for c in m.tool_calls or [] %}<call>{{ c.function | tojson }}</call>"
                "{% endfor %}{{ m.content or '' }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
    tok.chat_template = template
    assert takes_tools(tok)
    req = ChatRequest.model_validate({"messages": HISTORY, "tools": [WEATHER]})
    messages, tools = chat_messages(req.messages, ToolUse(req.tools, req.tool_choice), native=True)
    assert messages[0]["role"] == "user" and tools == [WEATHER]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert messages[2] == {"role": "tool", "content": "sunny, 24 C", "tool_call_id": "call_1", "name": "get_weather"}
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    assert text.startswith("<tools>[{") and '<call>{"name": "get_weather", "arguments": {"city": "Paris"}}' in text


# ------------------------------------------------------------------ langchain-openai


@pytest.fixture(scope="module")
def chat_model(base_url):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=base_url, api_key="unused", model="m", temperature=0, max_tokens=40, max_retries=0)


def test_langchain_invoke_stream_and_batch(chat_model):
    short = chat_model.bind(max_tokens=8)
    text = short.invoke("Say hello.").content
    assert text and "".join(c.content for c in short.stream("Say hello.")) == text
    assert [m.content for m in short.batch(["Say hello.", "Count to three."])][0] == text


def test_langchain_structured_output_and_bind_tools(chat_model):
    from langchain_core.messages import HumanMessage, ToolMessage

    for method in ("json_schema", "function_calling"):
        assert isinstance(chat_model.with_structured_output(Person, method=method).invoke(
            "Describe a person as JSON with a name and an age."), Person)
    bound = chat_model.bind_tools([get_weather], tool_choice="get_weather")
    ai = bound.invoke("What is the weather in Paris?")
    (call,) = ai.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city"}
    chunks = list(chat_model.bind_tools([get_weather], tool_choice="any").stream("What is the weather in Paris?"))
    streamed = sum(chunks[1:], chunks[0])
    assert streamed.tool_calls[0]["name"] == "get_weather"
    answer = chat_model.bind_tools([get_weather]).invoke(
        [HumanMessage("What is the weather in Paris?"), ai, ToolMessage("sunny, 24 C", tool_call_id=call["id"])])
    assert answer.content or answer.tool_calls  # the history with a call and its result is accepted


# ------------------------------------------------------------------ instructor


def test_instructor_tools_and_json_modes(oai):
    import instructor

    for mode in (instructor.Mode.TOOLS, instructor.Mode.JSON):
        person = instructor.from_openai(oai, mode=mode).chat.completions.create(
            model="m", response_model=Person, max_retries=0, temperature=0, max_tokens=40,
            messages=[{"role": "user", "content": "Describe a person with a name and an age."}])
        assert isinstance(person, Person)


# ------------------------------------------------------------------ lm-eval


@pytest.fixture(scope="module")
def lm_eval_tasks(tmp_path_factory):
    """The shipped task configs, their data file made absolute and the datasets cache in a temporary folder; lm-eval
    imported offline (no hub: the data is local, the tokenizer the client bundle's)."""
    import os
    from pathlib import Path

    import yaml

    cache = tmp_path_factory.mktemp("hf-datasets")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            mp.setenv(name, "1")
        mp.setenv("HF_DATASETS_CACHE", str(cache))
        import datasets

        for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # read at import, which may have come before this
            mp.setattr(datasets.config, name, True)
        root = Path(__file__).resolve().parent.parent
        configs = {}
        for task in ("stip_tiny_mc", "stip_tiny_gen"):
            cfg = yaml.safe_load((root / LM_EVAL_TASKS / f"{task}.yaml").read_text())
            data = cfg["dataset_kwargs"]["data_files"]
            data["test"] = os.fspath(root / data["test"])
            cfg["dataset_kwargs"]["cache_dir"] = os.fspath(cache)
            configs[task] = cfg
        from lm_eval.tasks import TaskManager

        # only these tasks: indexing lm-eval's thousands of built-in task files takes ~10 s
        yield configs, TaskManager(include_defaults=False)


def _per_item(result, task: str) -> list[list[float]]:
    return [[float(ll) for ll, _ in s["filtered_resps"]] for s in sorted(result["samples"][task],
                                                                         key=lambda s: s["doc_id"])]


def test_lm_eval_multiple_choice_through_the_proxy_equals_the_hf_backend_on_the_plain_model(
        lm_eval_tasks, base_url, smollm2_protected, smollm2_plain):
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    configs, tasks = lm_eval_tasks
    task = configs["stip_tiny_mc"]
    proxied = lm_eval.simple_evaluate(
        model="local-completions", tasks=[task], task_manager=tasks, log_samples=True, batch_size=8,
        model_args={"base_url": base_url + "/completions", "model": "m", "tokenizer": str(smollm2_protected / "client"),
                    "tokenizer_backend": "huggingface", "tokenized_requests": True, "max_retries": 1})
    model, tok = smollm2_plain
    plain = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=8), tasks=[task],
                                    task_manager=tasks, log_samples=True)
    ours, theirs = _per_item(proxied, "stip_tiny_mc"), _per_item(plain, "stip_tiny_mc")
    assert len(ours) == len(theirs) == 10 and all(len(a) == len(b) == 4 for a, b in zip(ours, theirs))
    diff = max(abs(x - y) for a, b in zip(ours, theirs) for x, y in zip(a, b))
    print(f"lm-eval stip_tiny_mc: acc {proxied['results']['stip_tiny_mc']['acc,none']} through stip proxy, "
          f"{plain['results']['stip_tiny_mc']['acc,none']} hf on the plain model; max |loglikelihood diff| {diff:.2e}")
    assert diff < 1e-4
    assert proxied["results"]["stip_tiny_mc"]["acc,none"] == plain["results"]["stip_tiny_mc"]["acc,none"]


def test_lm_eval_chat_generate_until_through_the_proxy(lm_eval_tasks, base_url):
    import lm_eval

    configs, tasks = lm_eval_tasks
    result = lm_eval.simple_evaluate(
        model="local-chat-completions", tasks=[configs["stip_tiny_gen"]], task_manager=tasks, log_samples=True,
        apply_chat_template=True,
        model_args={"base_url": base_url + "/chat/completions", "model": "m", "max_retries": 1, "num_concurrent": 4})
    samples = result["samples"]["stip_tiny_gen"]
    assert len(samples) == 10 and all(isinstance(s["resps"][0][0], str) and s["resps"][0][0] for s in samples)
    assert result["results"]["stip_tiny_gen"]["exact_match,last_word"] > 0
