"""The light client (issue 22): the data owner's generation path runs without torch or transformers, and gives what
the full install's client gives, on the same server.

A venv with only pyproject.toml's base dependencies (tests/light/venv.py: copied from this environment's installed
files, no torch, no transformers) runs `tests.light.run_client` against `stip serve` from the full install, on
SmolLM2 (its real tokenizer and chat template); the full install runs the same script against the same server. Same
prompt ids, greedy tokens and log-probabilities on both downlinks, the same seeded samples, the same JSON-mode
tokens and prompt scores. The light tokenizer is also checked against transformers' own; `stip chat` and
`stip proxy` run from the light venv (the proxy's image 400 for a model that takes images: test_llava).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.light.venv import REPO, shared

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def light_python(tmp_path_factory):
    return shared(tmp_path_factory)  # test_llava's light proxy uses the same venv


@pytest.fixture(scope="module")
def smol_server(smollm2_server):
    return smollm2_server  # tests/conftest.py: shared with other modules


def _run(python, bundle, url, cwd) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(python), "-m", "tests.light.run_client", str(bundle), url], capture_output=True,
                          text=True, timeout=600, env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_light_venv_has_no_torch(light_python):
    done = subprocess.run([str(light_python), "-c", "import torch"], capture_output=True, text=True, cwd="/")
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr
    done = subprocess.run([str(light_python), "-c", "import transformers"], capture_output=True, text=True, cwd="/")
    assert done.returncode != 0 and "No module named 'transformers'" in done.stderr


def test_light_client_generates_what_the_full_client_generates(light_python, smollm2_protected, smol_server):
    bundle = smollm2_protected / "client"
    light = _run(light_python, bundle, smol_server.url, "/")  # the checkout comes from the venv's .pth
    full = _run(sys.executable, bundle, smol_server.url, REPO)
    assert light["modules"] == []  # nothing imported torch or transformers on the way
    for key in ("prompt_ids", "chat_text", "greedy_topk", "greedy_logits", "seeded_topk", "seeded_logits",
                "json_mode", "score"):
        assert light[key] == full[key], key
    assert light["greedy_topk"]["ids"] == light["greedy_logits"]["ids"]
    assert len(light["seeded_topk"]) and light["seeded_topk"] == light["seeded_logits"]  # top_k 40 <= k 64


def test_light_tokenizer_matches_transformers(smollm2_protected):
    from transformers import AutoTokenizer

    from stip.client.bundle import ClientBundle

    bundle = ClientBundle.load(smollm2_protected / "client")
    light = bundle.tokenizer
    with bundle.signed_view() as folder:
        full = AutoTokenizer.from_pretrained(folder)
    chats = [[{"role": "user", "content": "Héllo <b>there</b> 😀"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for chat in chats:
        for kw in ({"add_generation_prompt": True}, {"add_generation_prompt": False}, {"tools": tools}):
            assert light.apply_chat_template(chat, tokenize=False, **kw) == \
                full.apply_chat_template(chat, tokenize=False, **kw)
    cont = chats[1][:3]
    assert light.apply_chat_template(cont, tokenize=False, continue_final_message=True) == \
        full.apply_chat_template(cont, tokenize=False, continue_final_message=True)
    for text in ["Hello world", " leading space", "x\n\n y <|im_start|> z", "", "naïve café ✓"]:
        for special in (True, False):
            assert light(text, add_special_tokens=special)["input_ids"] == \
                full(text, add_special_tokens=special)["input_ids"]
    ids = full("Hi <|im_end|> there é ✓")["input_ids"]
    for skip in (True, False):
        assert light.decode(ids, skip_special_tokens=skip) == \
            full.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    assert light.all_special_ids == full.all_special_ids
    assert light.convert_ids_to_tokens(ids) == full.convert_ids_to_tokens(ids)


def test_stip_chat_runs_in_the_light_venv(light_python, smollm2_protected, smol_server):
    """`stip chat --prompt` with the light install prints what the full install's client generates."""
    prompt = "Name three colours of the rainbow."
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(light_python), "-m", "stip.cli", "chat", str(smollm2_protected / "client"),
                           "--server", smol_server.url, "--prompt", prompt, "--max-tokens", "12"],
                          capture_output=True, text=True, timeout=300, env=env, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    import stip

    want = stip.Client(smollm2_protected / "client", smol_server.url).generate(
        messages=[{"role": "user", "content": prompt}], max_tokens=12).text
    assert want.strip() and want.strip() in done.stdout


def test_stip_proxy_runs_in_the_light_venv(light_python, smollm2_protected, smol_server):
    """`stip proxy` from the light install (a real subprocess, no torch) answers chat completions and completions,
    whole and streamed, with the full install's client's greedy text and logprobs (and each token's bytes); JSON mode
    and a forced tool call run llguidance there; an image part for this text model is a 400."""
    import httpx

    import stip
    from stip.client.constrained import json_grammar
    from stip.client.proxy_responses import TokenText
    from stip.server.launch import local_process
    from tests.parties import stopped_in_background

    bundle = smollm2_protected / "client"
    full = stip.Client(bundle, smol_server.url)
    eos, token_text = set(full.bundle.eos_token_ids), TokenText(full.bundle)
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    chat = full.generate(messages=messages, max_tokens=12, logprobs=2)
    done = [lp for lp in chat.logprobs if lp.token_id not in eos]
    with stopped_in_background(local_process(
            lambda port: [str(light_python), "-m", "stip.cli", "proxy", str(bundle), "--server", smol_server.url,
                          "--port", str(port)], ready_path="/v1/models", env={"PYTHONPATH": ""})) as proxy:
        http = httpx.Client(base_url=proxy.url + "/v1", timeout=120)
        body = {"messages": messages, "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 2}
        r = http.post("/chat/completions", json=body).json()["choices"][0]
        content = r["logprobs"]["content"]
        assert r["message"]["content"] == chat.text
        assert [(c["logprob"], c["bytes"]) for c in content] == [(lp.logprob, token_text(lp.token_id)[1])
                                                                 for lp in done]
        assert [[t["logprob"] for t in c["top_logprobs"]] for c in content] == [[v for _, v in lp.top] for lp in done]
        with http.stream("POST", "/chat/completions", json={**body, "stream": True}) as stream:
            chunks = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == chat.text
        prompt = "The three primary colours are"
        want = full.generate(prompt=prompt, max_tokens=8, logprobs=1)
        r = http.post("/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0,
                                            "logprobs": 1}).json()["choices"][0]
        assert r["text"] == want.text
        assert r["logprobs"]["token_logprobs"] == [lp.logprob for lp in want.logprobs if lp.token_id not in eos]
        with http.stream("POST", "/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0,
                                                       "stream": True}) as stream:
            chunks = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == want.text
        r = http.post("/chat/completions", json={"messages": messages, "max_tokens": 12, "temperature": 0,
                                                 "response_format": {"type": "json_object"}}).json()
        assert r["choices"][0]["message"]["content"] == \
            full.generate(messages=messages, max_tokens=12, grammar=json_grammar(None)).text
        tool = {"type": "function", "function": {"name": "paint", "parameters": {
            "type": "object", "properties": {"colour": {"type": "string", "maxLength": 8}}, "required": ["colour"]}}}
        r = http.post("/chat/completions", json={"messages": messages, "max_tokens": 48, "temperature": 0,
                                                 "tools": [tool], "tool_choice": "required"}).json()["choices"][0]
        assert r["finish_reason"] == "tool_calls", r
        call = r["message"]["tool_calls"][0]["function"]
        assert call["name"] == "paint" and isinstance(json.loads(call["arguments"])["colour"], str)
        image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                                              {"type": "text", "text": "What is this?"}]}]
        r = http.post("/chat/completions", json={"messages": image, "max_tokens": 2})
        assert r.status_code == 400 and "takes no images" in r.json()["error"]["message"]
