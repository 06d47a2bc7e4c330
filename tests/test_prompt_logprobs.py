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
