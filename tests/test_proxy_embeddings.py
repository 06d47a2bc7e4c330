"""`stip proxy`'s OpenAI `/v1/embeddings` on the real all-MiniLM-L6-v2: a real `stip serve` and a real `stip proxy`
subprocess, the official `openai` client, vectors compared with the plain model's sentence embeddings. Requests of
the wrong kind (chat on an encoder, `stip chat` on an encoder bundle) get clear errors; embeddings on a decoder: see
test_proxy.py, whose SmolLM2 proxy is running anyway. The light install's `stip embed` gives the full client's vectors
exactly."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest

from stip.client.proxy_embeddings import batches
from stip.server.launch import local_process, server_env
from tests.parties import serve, stopped_in_background
from tests.test_encoders import plain_sentence_embeddings

SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome, and everyone in the theatre applauded loudly at the end.",
    "Private inference keeps prompts away from the cloud.",
    "Cats sleep.",
    "A permutation is a secret reordering of the hidden dimensions; the server never learns it.",
]
MANY = [f"Sentence number {i} " + "word " * (i % 7) for i in range(37)]  # more than one server batch, mixed lengths


@pytest.fixture(scope="module")
def plain(minilm):
    """`vectors`: text -> the plain model's sentence embedding (BertModel, mean pooling, normalized); `tokens`: text ->
    its token count."""
    from transformers import AutoTokenizer

    folder, _ = minilm
    texts = list(dict.fromkeys(SENTENCES + MANY))
    vectors = plain_sentence_embeddings(folder, texts).numpy()
    tok = AutoTokenizer.from_pretrained(folder)
    return SimpleNamespace(vectors=dict(zip(texts, vectors)),
                           tokens={t: len(ids) for t, ids in zip(texts, tok(texts)["input_ids"])})


@pytest.fixture(scope="module")
def parties(minilm):
    """(stip serve, stip proxy) subprocesses: the proxy holds the client bundle, the server only its own."""
    protected = minilm[1]
    with serve(protected, token="t") as server, stopped_in_background(local_process(
            lambda port: [sys.executable, "-m", "stip.cli", "proxy", str(protected / "client"), "--server",
                          server.url, "--port", str(port)], ready_path="/v1/models", token="t")) as proxy:
        yield server, proxy


@pytest.fixture(scope="module")
def oai(parties):
    return openai.OpenAI(base_url=parties[1].url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _check(got: np.ndarray, texts: list[str], plain) -> None:
    want = np.stack([plain.vectors[t] for t in texts])
    assert got.shape == want.shape
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    print(f"min cosine {cos.min():.8f}, max-abs diff {np.abs(got - want).max():.2e}")
    assert cos.min() >= 0.99999


def test_models_lists_the_encoder(oai):
    assert [m.id for m in oai.models.list().data] == ["stip-bert"]


def test_float_vectors_equal_the_plain_model(oai, plain):
    r = oai.embeddings.create(model="minilm", input=SENTENCES, encoding_format="float")
    assert [d.index for d in r.data] == list(range(len(SENTENCES)))
    assert r.model == "minilm"
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(plain.tokens[t] for t in SENTENCES)
    _check(np.array([d.embedding for d in r.data], dtype=np.float32), SENTENCES, plain)


def test_base64_vectors_equal_the_plain_model(oai, parties, plain):
    # The openai client asks for base64 by default and decodes it itself.
    r = oai.embeddings.create(model="minilm", input=SENTENCES)
    _check(np.array([d.embedding for d in r.data], dtype=np.float32), SENTENCES, plain)
    # On the wire: little-endian float32, as OpenAI sends it; one string is one input.
    raw = httpx.post(parties[1].url + "/v1/embeddings", timeout=60,
                     json={"model": "m", "input": SENTENCES[0], "encoding_format": "base64"}).json()
    assert len(raw["data"]) == 1
    vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert vec.shape == (384,)
    _check(vec[None], SENTENCES[:1], plain)


def test_many_inputs_travel_in_batches_and_keep_their_order(oai, plain):
    assert len(batches([plain.tokens[t] for t in MANY])) > 1
    r = oai.embeddings.create(model="minilm", input=MANY, encoding_format="float", dimensions=384)
    _check(np.array([d.embedding for d in r.data], dtype=np.float32), MANY, plain)


def test_batches_are_bounded_and_cover_every_input():
    lengths = [5, 300, 7, 7, 1, 9000, 64] * 10
    out = batches(lengths, max_inputs=8, max_tokens=512)
    assert sorted(i for b in out for i in b) == list(range(len(lengths)))
    for b in out:
        assert len(b) <= 8
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 512


@pytest.mark.parametrize("body, param, words", [
    ({"input": [[101, 102]]}, "input", "token-id input"),
    ({"input": [1, 2, 3]}, "input", "token-id input"),
    ({"input": ["fine", ""]}, "input", "input[1] is an empty string"),
    ({"input": []}, "input", "input is empty"),
    ({"input": "x", "dimensions": 128}, "dimensions", "384 dimensions"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
    ({"input": "x", "truncate": True}, "truncate", "unknown parameter"),
    ({"input": "word " * 600}, "input", "takes at most 512"),
])
def test_bad_requests_get_openai_400s(parties, body, param, words):
    r = httpx.post(parties[1].url + "/v1/embeddings", json={"model": "m", **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_generation_on_an_encoder_is_refused_naming_the_task(oai):
    for call in (lambda: oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}]),
                 lambda: oai.completions.create(model="m", prompt="hi")):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert "feature-extraction" in str(e.value) and "/v1/embeddings" in str(e.value)
    assert len(oai.embeddings.create(model="m", input="still serving").data) == 1  # and the proxy serves on


def test_stip_chat_on_an_encoder_bundle_is_a_cli_error(parties, minilm):
    r = subprocess.run([sys.executable, "-m", "stip.cli", "chat", str(minilm[1] / "client"), "--server",
                        parties[0].url, "-p", "hi"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "feature-extraction" in r.stderr and "stip embed" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr



def test_light_client_embeds_what_the_full_client_embeds(parties, minilm, plain, tmp_path_factory):
    """`stip embed` from the light install (no torch or transformers; tests/light/venv.py) prints the full install's
    sentence embeddings exactly: the encoder's client half is the same numpy code in both."""
    from stip.client.sdk import Client
    from tests.light.venv import shared

    texts = SENTENCES[:3]
    r = subprocess.run([str(shared(tmp_path_factory)), "-m", "stip.cli", "embed", "--client", str(minilm[1] / "client"),
                        "--server", parties[0].url, *texts], capture_output=True, text=True, timeout=120,
                       env={**server_env("t"), "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    light = json.loads(r.stdout)
    assert light == Client(minilm[1] / "client", parties[0].url, token="t").embed(texts).tolist()
    _check(np.array(light, dtype=np.float32), texts, plain)
