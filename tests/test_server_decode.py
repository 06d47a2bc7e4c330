"""Server-decode mode (`stip protect --mode server-decode`): the server bundle is a stock checkpoint in the permuted
vocabulary; real `stip serve` subprocesses sample by themselves, `stip.Client` and `stip proxy` map ids both ways.

Tiny models get a tiny word-level tokenizer with a chat template (built here), and an EOS id that greedy decoding of
PROMPT reaches after a few tokens, so EOS, stop strings and the chat template are tested without real weights.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

import stip
from stip.client.bundle import ClientBundle
from stip.client.sdk import Client
from stip.client.transport import Connection, StipServerError
from stip.reference import plain_greedy
from stip.server.launch import local_process
from tests.models import VOCAB, build_tiny, tiny_configs
from tests.parties import ServerPipeline, serve, stopped_in_background

PROMPT = [3, 17, 42, 5, 9, 11]
EOS_AT = 4  # the plain model's greedy output reaches EOS at this index or later
TOKEN = "t"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAMILIES = list(tiny_configs())


def tiny_tokenizer():
    """Word-level: id i is the word "w{i}" (0-2 are <unk>, <s>, </s>); a chat template of plain words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}w5"
    return fast


def words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def continuation(tok, ids, prompt=PROMPT) -> str:
    """The text `ids` add after `prompt`, as the client's tokenizer decodes it."""
    def text(x):
        return tok.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text(list(prompt) + list(ids))[len(text(prompt)):]


def _save(name: str, folder: Path) -> tuple[Path, int]:
    """A tiny model whose EOS is the token its greedy decoding of PROMPT reaches at EOS_AT; (folder, eos)."""
    model = build_tiny(name)
    free = plain_greedy(model, PROMPT, 12)
    eos = next(t for t in free[EOS_AT:] if t not in free[:EOS_AT] and t > 2)
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder, eos


@pytest.fixture(scope="session")
def sd(tmp_path_factory):
    """name -> (plain folder, protected folder, eos), protected in server-decode mode on first use."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            root = tmp_path_factory.mktemp(f"sd-{name}")
            plain, eos = _save(name, root / "plain")
            stip.protect(plain, root / "protected", progress=False, mode="server-decode")
            cache[name] = (plain, root / "protected", eos)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def long_sd(tmp_path_factory) -> Path:
    """A tiny llama with room for 4096 positions, protected in server-decode mode: raw requests without stop ids run
    to max_tokens, long enough (seconds) that a test can hold a generation open or leave it mid-stream."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.models import _randomise

    root = tmp_path_factory.mktemp("sd-long")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    _randomise(LlamaForCausalLM(config), 0).save_pretrained(root / "plain")
    stip.protect(root / "plain", root / "protected", progress=False, mode="server-decode")
    return root / "protected"


def _wait_kv_zero(server) -> int:
    deadline = time.monotonic() + 30
    while _kv_tokens(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _kv_tokens(server)


def _plain(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# ------------------------------------------------------------------ the bundle


@pytest.mark.parametrize("name", FAMILIES)
def test_server_bundle_is_a_stock_checkpoint_in_permuted_ids(sd, name):
    from transformers import AutoModelForCausalLM

    plain_dir, out, eos = sd(name)
    server = AutoModelForCausalLM.from_pretrained(out / "server", output_loading_info=True)
    model, info = server
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    plain = _plain(plain_dir)
    assert model.config.tie_word_embeddings == plain.config.tie_word_embeddings
    bundle = ClientBundle.load(out / "client")
    to_server = bundle.key.vocab.inverse_perm
    assert bundle.mode == "server-decode" and bundle.token_embedding is None
    # special ids remapped in config.json and generation_config.json
    gen = json.loads((out / "server" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == int(to_server[eos])
    assert json.loads((out / "server" / "config.json").read_text())["eos_token_id"] == int(to_server[eos])
    # the same function in another vocabulary order
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        diff = float((bundle.plain_logits(model(bundle.server_ids(ids)).logits) - plain(ids).logits).abs().max())
    print(f"{name}: max |logit difference| server-decode vs plain = {diff:.2e}")
    assert diff < 1e-4
    mask = torch.ones_like(ids)  # explicit: with a pad id, generate would guess a mask from the ids
    got = model.generate(bundle.server_ids(ids), attention_mask=mask, max_new_tokens=10, do_sample=False)
    want = plain.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert bundle.plain_ids(got[0, len(PROMPT):]).tolist() == want[0, len(PROMPT):].tolist()
    # transformers stops at the remapped EOS by itself
    assert bundle.plain_ids(got[0, -1]).item() == eos and got.shape[1] < len(PROMPT) + 10


@pytest.mark.parametrize("name", FAMILIES)
def test_no_leakage_in_the_server_bundle(sd, name):
    plain_dir, out, _ = sd(name)
    server = out / "server"
    names = {p.name for p in server.iterdir()}
    assert not names & {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                        "merges.txt", "tokenizer.model", "chat_template.jinja"}, names
    assert not any(n.endswith((".stipkey", ".key")) for n in names), names
    for role in ("server", "client", "developer"):
        assert json.loads((out / role / "stip-manifest.json").read_text())["mode"] == "server-decode"
    assert not list((out / "client").glob("embedding-*")), "the client needs no embedding table"
    original = load_file(str(plain_dir / "model.safetensors"))
    orig_rows = {r.numpy().tobytes() for t in original.values() for r in (t.reshape(t.shape[0], -1) if t.ndim > 1
                                                                           else t.reshape(1, -1))}
    orig_tensors = {t.numpy().tobytes() for t in original.values()}
    served = {}
    for shard in server.glob("*.safetensors"):
        served |= load_file(str(shard))
    assert served and all(t.is_floating_point() for t in served.values()), "no integer (key) tensor"
    for n, t in served.items():
        assert t.numpy().tobytes() not in orig_tensors, f"{n} equals an original tensor"
        rows = t.reshape(t.shape[0], -1) if t.ndim > 1 else t.reshape(1, -1)
        same = [i for i, r in enumerate(rows) if r.numpy().tobytes() in orig_rows]
        assert not same, f"{n}: rows {same[:5]} equal rows of the original weights"


def test_mode_is_checked(tmp_path, sd):
    from typer.testing import CliRunner

    from stip.cli import app

    plain_dir, _, _ = sd("llama-gqa-untied")
    r = CliRunner().invoke(app, ["protect", str(plain_dir), "--out", str(tmp_path / "x"), "--mode", "both"])
    assert r.exit_code != 0 and "unknown mode 'both'" in r.output and not (tmp_path / "x").exists()


# ------------------------------------------------------------------ a real server


GREEDY = [("gpt2", ()), ("qwen2-bias-tied", ()), ("mistral-gqa", ("--no-batching",))]


@pytest.fixture(scope="module")
def servers(sd):
    """A ServerPipeline for this module's servers in the order the tests use them: the next starts while one is used."""
    starts = {(name, args): (lambda out=sd(name)[1], args=args: serve(out, *args, token=TOKEN))
              for name, args in GREEDY + [("llama-gqa-untied", ())]}
    pipeline = ServerPipeline(starts)
    yield pipeline
    pipeline.close()


@pytest.fixture(scope="module")
def llama(sd, servers):
    plain_dir, out, eos = sd("llama-gqa-untied")
    with servers.use(("llama-gqa-untied", ())) as server:
        yield server, _plain(plain_dir), out, eos


@pytest.mark.parametrize("name,args", GREEDY)
def test_client_greedy_equals_plain(sd, servers, name, args):
    plain_dir, out, eos = sd(name)
    plain = _plain(plain_dir)
    with servers.use((name, args)) as server:
        client = Client(out / "client", server.url, token=TOKEN)
        g = client.generate(ids=PROMPT, max_tokens=12)
        assert g.token_ids == plain_greedy(plain, PROMPT, 12, [eos])
        assert g.finish_reason == "stop" and g.token_ids[-1] == eos and len(g.token_ids) > EOS_AT
        assert g.text == continuation(client.tokenizer, g.token_ids[:-1])


def test_client_stops_at_eos_and_at_length(llama):
    server, plain, out, eos = llama
    client = Client(out / "client", server.url, token=TOKEN)
    g = client.generate(ids=PROMPT, max_tokens=30)
    assert g.token_ids == plain_greedy(plain, PROMPT, 30, [eos]) and g.finish_reason == "stop"
    short = client.generate(ids=PROMPT, max_tokens=2)
    assert short.token_ids == g.token_ids[:2] and short.finish_reason == "length"
    assert short.usage == {"prompt_tokens": len(PROMPT), "completion_tokens": 2, "total_tokens": len(PROMPT) + 2}


def test_stop_strings_end_the_stream_on_the_client(llama):
    server, plain, out, eos = llama
    client = Client(out / "client", server.url, token=TOKEN)
    full = plain_greedy(plain, PROMPT, 30, [eos])
    stop = f"w{full[2]}"
    g = client.generate(prompt=words(PROMPT), max_tokens=30, stop=[stop])
    assert g.finish_reason == "stop" and g.text == continuation(client.tokenizer, full[:2]) + " "
    deltas = list(client.stream(prompt=words(PROMPT), max_tokens=30, stop=[stop]))
    assert "".join(deltas) == g.text


def test_seeded_sampling_is_reproducible_and_logprobs_are_the_models(llama):
    server, plain, out, _ = llama
    client = Client(out / "client", server.url, token=TOKEN)
    kw = dict(ids=PROMPT, max_tokens=8, temperature=1.5, top_p=0.9, top_k=40, seed=7, presence_penalty=0.5)
    a, b = client.generate(**kw), client.generate(**kw)
    assert a.token_ids == b.token_ids
    g = client.generate(ids=PROMPT, max_tokens=3, logprobs=3)
    with torch.no_grad():
        lp = torch.log_softmax(plain(torch.tensor([PROMPT + g.token_ids])).logits[0].float(), -1)
    for i, t in enumerate(g.logprobs):
        row = lp[len(PROMPT) - 1 + i]
        assert t.token_id == g.token_ids[i] and abs(t.logprob - float(row[t.token_id])) < 1e-4
        assert [x for x, _ in t.top] == torch.topk(row, 3).indices.tolist()
    with pytest.raises(ValueError, match="repetition_penalty"):
        client.stream(ids=PROMPT, repetition_penalty=1.2)


def test_bad_input_gets_4xx_and_the_server_keeps_serving(llama):
    server, plain, out, eos = llama
    url = server.url + "/v1/generate"
    cases = [({"ids": [VOCAB], "max_tokens": 3}, 422, "out of range"),
             ({"ids": [1], "max_tokens": 3, "stop_ids": [-1]}, 422, "stop_ids"),
             ({"ids": [], "max_tokens": 3}, 422, "ids"),
             ({"ids": [1], "max_tokens": 0}, 422, "max_tokens"),
             ({"ids": [1], "max_tokens": 3, "logprobs": 21}, 422, "logprobs"),
             ({"ids": [1], "max_tokens": 3, "tools": []}, 422, "tools"),
             ({"ids": [1] * 200, "max_tokens": 3}, 413, "max_seq_len"),
             ("{not json", 400, "malformed JSON"),
             ("[1, 2]", 422, "")]
    for body, status, words_ in cases:
        content = body if isinstance(body, str) else json.dumps(body)
        r = httpx.post(url, content=content, headers=AUTH, timeout=30)
        assert r.status_code == status, (body, r.text)
        assert words_ in r.json()["error"]
    assert httpx.post(url, json={"ids": [1], "max_tokens": 1}, timeout=30).status_code == 401
    # the websocket session route refuses clearly
    with pytest.raises(StipServerError, match="server-decode bundle") as e:
        Connection(server.url, token=TOKEN).open_session()
    assert e.value.status == 400
    client = Client(out / "client", server.url, token=TOKEN)
    assert client.generate(ids=PROMPT, max_tokens=30).token_ids == plain_greedy(plain, PROMPT, 30, [eos])


def _kv_tokens(server) -> int:
    return httpx.get(server.url + "/v1/info", headers=AUTH, timeout=30).json()["kv_tokens"]


def test_a_client_leaving_mid_stream_frees_its_kv(long_sd, llama):
    server, plain, out, eos = llama
    with serve(long_sd, token=TOKEN) as long_server:
        body = {"ids": PROMPT, "max_tokens": 4000}
        for lines_read in (0, 3):  # leave before the first token, and after a few
            with httpx.Client(timeout=30) as h, h.stream("POST", long_server.url + "/v1/generate", json=body,
                                                         headers=AUTH) as r:
                assert r.status_code == 200
                assert _kv_tokens(long_server) == len(PROMPT) + 4000  # reserved before it started
                lines = r.iter_lines()
                for _ in range(lines_read):
                    assert json.loads(next(lines)).get("finish_reason") is None
            assert _wait_kv_zero(long_server) == 0
        r = httpx.post(long_server.url + "/v1/generate", json={"ids": PROMPT, "max_tokens": 5}, headers=AUTH,
                       timeout=30)
        assert r.status_code == 200 and json.loads(r.text.splitlines()[-1])["completion_tokens"] == 5
    client = Client(out / "client", server.url, token=TOKEN)
    assert client.generate(ids=PROMPT, max_tokens=30).token_ids == plain_greedy(plain, PROMPT, 30, [eos])


def test_admission_reserves_prompt_plus_max_tokens(long_sd):
    """A generation takes a session slot and prompt + max_tokens KV tokens before it starts: 503 when the server is
    full, 429 over the client's quota, both before any compute; everything returns when the stream ends."""
    url_of = lambda server: server.url + "/v1/generate"  # noqa: E731
    pipeline = ServerPipeline({  # the second server starts while the first is tested
        "budget": lambda: serve(long_sd, "--kv-budget-tokens", "3000", token=TOKEN),
        "quota": lambda: serve(long_sd, "--client-max-sessions", "1", token=TOKEN)})
    try:
        _admission_checks(pipeline, url_of)
    finally:
        pipeline.close()


def _admission_checks(pipeline, url_of):
    with pipeline.use("budget") as server:
        r = httpx.post(url_of(server), json={"ids": PROMPT, "max_tokens": 3000}, headers=AUTH, timeout=30)
        assert r.status_code == 503 and "KV budget" in r.json()["error"] and r.headers["Retry-After"]
        with httpx.Client(timeout=30) as h, h.stream("POST", url_of(server), json={"ids": PROMPT, "max_tokens": 2500},
                                                     headers=AUTH) as held:
            assert held.status_code == 200 and _kv_tokens(server) == len(PROMPT) + 2500
            r = httpx.post(url_of(server), json={"ids": PROMPT, "max_tokens": 600}, headers=AUTH, timeout=30)
            assert r.status_code == 503
        assert _wait_kv_zero(server) == 0
        r = httpx.post(url_of(server), json={"ids": PROMPT, "max_tokens": 600}, headers=AUTH, timeout=30)
        assert r.status_code == 200
    with pipeline.use("quota") as server:
        with httpx.Client(timeout=30) as h, h.stream("POST", url_of(server), json={"ids": PROMPT, "max_tokens": 4000},
                                                     headers=AUTH) as held:
            assert held.status_code == 200
            r = httpx.post(url_of(server), json={"ids": PROMPT, "max_tokens": 5}, headers=AUTH, timeout=30)
            assert r.status_code == 429 and "too many sessions" in r.json()["error"]


def test_round_trip_and_server_decode_do_not_mix(llama, tiny_protected):
    server, _, out, _ = llama
    _, rt = tiny_protected("llama-gqa-untied")
    with serve(rt, token=TOKEN) as rt_server:
        r = httpx.post(rt_server.url + "/v1/generate", json={"ids": [1], "max_tokens": 1}, headers=AUTH, timeout=30)
        assert r.status_code == 400 and "round-trip bundle" in r.json()["error"]
        with pytest.raises(stip.errors.KeyMismatchError):
            Client(out / "client", rt_server.url, token=TOKEN)
    info = httpx.get(server.url + "/v1/info", headers=AUTH, timeout=30).json()
    assert info["mode"] == "server-decode"


def test_proxy_and_openai_client_greedy_equals_plain(llama):
    openai = pytest.importorskip("openai")
    server, plain, out, eos = llama
    tok = tiny_tokenizer()
    messages = [{"role": "user", "content": words(PROMPT)}]
    chat_ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
    want = plain_greedy(plain, chat_ids, 20, [eos])
    with local_process(lambda port: [sys.executable, "-m", "stip.cli", "proxy", str(out / "client"), "--server",
                                     server.url, "--port", str(port)], ready_path="/v1/models",
                       env={"STIP_TOKEN": TOKEN}) as proxy:
        oai = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = oai.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=20)
        expected_text = continuation(tok, want[:-1] if want[-1] == eos else want, chat_ids)
        assert r.choices[0].message.content == expected_text
        assert r.choices[0].finish_reason == ("stop" if want[-1] == eos else "length")
        assert r.usage.prompt_tokens == len(chat_ids)
        chunks = oai.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=20,
                                             stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_text
        c = oai.completions.create(model="m", prompt=words(PROMPT), temperature=0, max_tokens=20, logprobs=2)
        assert c.choices[0].text == continuation(tok, plain_greedy(plain, PROMPT, 20, [eos])[:-1])


# ------------------------------------------------------------------ SmolLM2


@pytest.mark.slow
def test_smollm2_server_decode_through_proxy(smollm2_server_decode, smollm2_plain):
    openai = pytest.importorskip("openai")
    out = smollm2_server_decode
    model, tok = smollm2_plain
    eos = [tok.convert_tokens_to_ids("<|im_end|>")]
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    chat_ids = tok(tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
    want = plain_greedy(model, chat_ids, 24, eos)
    assert want[-1] in eos, "the prompt must end at EOS within 24 tokens, so that stopping at EOS is tested"
    text = tok.decode(want, skip_special_tokens=True)
    with serve(out) as server, stopped_in_background(local_process(
            lambda port: [sys.executable, "-m", "stip.cli", "proxy", str(out / "client"), "--server", server.url,
                          "--port", str(port)], ready_path="/v1/models")) as proxy:
        oai = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=120)
        r = oai.chat.completions.create(model="m", messages=chat, temperature=0, max_tokens=24)
        assert r.choices[0].message.content == text
        assert r.choices[0].finish_reason == "stop"
        s = oai.chat.completions.create(model="m", messages=chat, temperature=0, max_tokens=24, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == text
