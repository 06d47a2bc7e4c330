"""Per-token logprobs from the SDK against plain transformers' log_softmax, on tiny models and a real server."""

from __future__ import annotations

import pytest
import torch

from stip.client.sdk import Client, Delta
from tests.parties import serve

PROMPT = [5, 17, 3, 88, 42, 9, 61, 23]
N = 12


def _reference(model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """log_softmax of the plain model's logits at each generated position (teacher-forced)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(generated)], -1)


@pytest.fixture(scope="module")
def tiny(tiny_protected):
    from transformers import AutoModelForCausalLM

    plain, protected = tiny_protected("llama-gqa-untied")
    model = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    with serve(protected) as server:
        yield model, protected, server


@pytest.mark.parametrize("downlink", ["logits", "topk"])
@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.0, seed=4, presence_penalty=0.5,
                                                   frequency_penalty=0.5, repetition_penalty=1.2)])
def test_logprobs_are_the_models_own(tiny, downlink, sampling):
    model, protected, server = tiny
    client = Client(protected / "client", server.url, downlink=downlink, k=16)
    g = client.generate(ids=PROMPT, max_tokens=N, logprobs=5, **sampling)
    assert len(g.logprobs) == len(g.token_ids) > 0
    ref = _reference(model, PROMPT, g.token_ids)
    for i, (t, lp) in enumerate(zip(g.token_ids, g.logprobs)):
        assert lp.token_id == t
        assert abs(lp.logprob - float(ref[i, t])) < 1e-4  # raw model logprob: before penalties and temperature
        values, ids = torch.topk(ref[i], 5)
        assert [a for a, _ in lp.top] == ids.tolist()
        torch.testing.assert_close(torch.tensor([b for _, b in lp.top]), values, atol=1e-4, rtol=0)


def test_logprobs_off_by_default_and_bounded_by_the_downlink(tiny):
    _, protected, server = tiny
    client = Client(protected / "client", server.url, downlink="topk", k=4)
    assert client.generate(ids=PROMPT, max_tokens=2).logprobs is None
    assert client.generate(ids=PROMPT, max_tokens=2, logprobs=0).logprobs[0].top == []
    with pytest.raises(ValueError, match="k=4"):
        client.generate(ids=PROMPT, max_tokens=2, logprobs=5)


@pytest.mark.slow
def test_streamed_deltas_carry_their_tokens_logprobs(smollm2_protected, smollm2_plain, smollm2_server):
    model, tok = smollm2_plain
    client = Client(smollm2_protected / "client", smollm2_server.url, downlink="logits")
    stream = client.stream(prompt="The capital of France is", max_tokens=10, logprobs=2)
    deltas = list(stream)
    g = stream.generation
    assert all(isinstance(d, Delta) for d in deltas)
    streamed = [lp for d in deltas for lp in d.logprobs]
    assert streamed == g.logprobs[:len(streamed)] and len(streamed) >= len(g.logprobs) - 1
    ref = _reference(model, g.prompt_ids, g.token_ids)
    for i, lp in enumerate(g.logprobs):
        assert abs(lp.logprob - float(ref[i, lp.token_id])) < 1e-3
