"""Prompt log-probabilities (issue 24 item 1): `Client.score` and the proxy's echo + logprobs, against the plain
model's log_softmax computed in-process from the unprotected weights (float32, 1e-4), through the chunked path where
the prompt is longer than the server's --max-all-logits allows in one step."""

from __future__ import annotations

import pytest
import torch

from stip.client.sdk import Client
from tests.parties import serve

PROMPT = [5, 17, 3, 88, 42, 9, 61, 23, 7, 11, 64, 2, 30]
CHUNK = 4  # positions per all-positions prefill the server below allows (--max-all-logits CHUNK x V)


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the plain model's logits, row p predicting token p+1."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


def check_scores(scores, ref: torch.Tensor, ids: list[int], top: int) -> None:
    assert len(scores) == len(ids) and scores[0] is None
    for p, lp in enumerate(scores[1:]):
        assert lp.token_id == ids[p + 1]
        assert abs(lp.logprob - float(ref[p, ids[p + 1]])) < 1e-4
        values, alt = torch.topk(ref[p], top)
        assert [a for a, _ in lp.top] == alt.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in lp.top]).reshape(-1), values, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tiny(tiny_protected):
    from transformers import AutoModelForCausalLM

    plain, protected = tiny_protected("llama-gqa-untied")
    model = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    with serve(protected, "--max-all-logits", str(CHUNK * vocab)) as server:
        yield model, protected, server


@pytest.mark.parametrize("downlink", ["topk", "logits"])
def test_score_equals_the_plain_models_log_softmax_through_chunks(tiny, downlink):
    model, protected, server = tiny
    client = Client(protected / "client", server.url, downlink=downlink)
    assert len(PROMPT) > CHUNK  # several all-positions prefills on one session
    ref = reference_logprobs(model, PROMPT)
    for top in (0, 1, 3):
        check_scores(client.score(ids=PROMPT, top=top), ref, PROMPT, top)
    one = client.score(ids=PROMPT[:1])
    assert one == [None]


def test_targets_cost_a_few_bytes_per_prompt_token_and_are_checked(tiny):
    from stip.client.session import Downlink

    model, protected, server = tiny
    client = Client(protected / "client", server.url)
    bundle = client.bundle
    x = bundle.embed(torch.tensor(PROMPT[:CHUNK]))
    aims = bundle.server_ids(PROMPT[1:CHUNK + 1])
    with client.connection.open_session() as s:
        r = s.prefill(x, positions="all", downlink=Downlink("topk", 1), targets=aims)
        assert r.bytes_received - 4 - 200 < CHUNK * 16  # 16 bytes per token (k = 1) and a header
        assert r.target_logits.shape == (CHUNK,)
    with client.connection.open_session() as s, pytest.raises(Exception, match="targets"):
        s.prefill(x, positions="all", downlink=Downlink("topk", 1), targets=torch.full((CHUNK,), bundle.vocab_size))
    with client.connection.open_session() as s, pytest.raises(Exception, match="max_all_logits"):
        s.prefill(bundle.embed(torch.tensor(PROMPT)), positions="all", downlink=Downlink("topk", 1),
                  targets=bundle.server_ids(PROMPT[1:] + [0]))


# ------------------------------------------------------------------ the proxy: echo + logprobs, as lm-eval asks

KEY = "proxy-key-prompt-logprobs"
TEXT = "The capital of France is Paris, and the capital of Germany is Berlin."
SMOL_CHUNK = 4  # positions per all-positions prefill: TEXT (16 tokens) goes in several


@pytest.fixture(scope="module")
def proxied(smollm2_protected, smollm2_plain):
    import sys

    import openai

    from stip.server.launch import local_process
    from tests.parties import stopped_in_background

    model, tok = smollm2_plain
    cap = str(SMOL_CHUNK * model.config.vocab_size)
    with serve(smollm2_protected, "--max-all-logits", cap) as server, stopped_in_background(local_process(
            lambda port: [sys.executable, "-m", "stip.cli", "proxy", str(smollm2_protected / "client"), "--server",
                          server.url, "--port", str(port)],
            ready_path="/health", env={"STIP_PROXY_API_KEY": KEY})) as proxy:
        yield openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEY, max_retries=0, timeout=300), model, tok


def check_echoed(lps, ids: list[int], ref: torch.Tensor, tok, top: int) -> None:
    """The echoed prompt's part of a legacy logprobs object: null first, then the plain model's logprobs."""
    n = len(ids)
    assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
    assert len(ids) > SMOL_CHUNK
    for p in range(1, n):
        assert abs(lps.token_logprobs[p] - float(ref[p - 1, ids[p]])) < 1e-4
        assert len(lps.top_logprobs[p]) == top
        best = int(ref[p - 1].argmax())
        assert abs(lps.top_logprobs[p][tok.convert_tokens_to_string([tok.convert_ids_to_tokens(best)])]
                   - float(ref[p - 1, best])) < 1e-4
    offsets = [sum(len(t) for t in lps.tokens[:p]) for p in range(n)]
    assert lps.text_offset[:n] == offsets


@pytest.mark.slow
def test_echo_with_max_tokens_0_scores_the_prompt(proxied):
    oai, model, tok = proxied
    ids = tok(TEXT)["input_ids"]
    ref = reference_logprobs(model, ids)
    r = oai.completions.create(model="m", prompt=TEXT, echo=True, logprobs=1, max_tokens=0, temperature=0)
    c = r.choices[0]
    assert c.text == TEXT and c.finish_reason == "length"
    assert len(c.logprobs.tokens) == len(ids) and "".join(c.logprobs.tokens) == TEXT
    check_echoed(c.logprobs, ids, ref, tok, 1)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    by_ids = oai.completions.create(model="m", prompt=[ids], echo=True, logprobs=3, max_tokens=0, temperature=0)
    check_echoed(by_ids.choices[0].logprobs, ids, ref, tok, 3)  # lm-eval sends token ids


@pytest.mark.slow
def test_echo_with_max_tokens_1_lists_the_prompt_then_the_generated_token(proxied):
    oai, model, tok = proxied
    ids = tok(TEXT)["input_ids"]
    r = oai.completions.create(model="m", prompt=TEXT, echo=True, logprobs=1, max_tokens=1, temperature=0)
    c = r.choices[0]
    lps = c.logprobs
    assert len(lps.tokens) == len(ids) + 1 and c.text == TEXT + lps.tokens[-1]
    ref = reference_logprobs(model, ids + [int(reference_logprobs(model, ids)[-1].argmax())])
    check_echoed(lps, ids, ref, tok, 1)
    assert lps.text_offset[-1] == len(TEXT)
    assert abs(lps.token_logprobs[-1] - float(ref[len(ids) - 1].max())) < 1e-4  # greedy: the most likely token


def test_the_proxy_refuses_max_tokens_0_without_echo_and_streamed_prompt_logprobs():
    from stip.client.proxy_requests import ApiError, CompletionRequest

    with pytest.raises(ApiError, match="echo"):
        CompletionRequest(prompt="x", max_tokens=0).top
    with pytest.raises(ApiError, match="stream"):
        CompletionRequest(prompt="x", echo=True, logprobs=1, stream=True).top
    assert CompletionRequest(prompt="x", echo=True, logprobs=2, max_tokens=0).top == 2
