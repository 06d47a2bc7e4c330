"""The client SDK against a real `stip serve` subprocess on loopback: text in, text out, equal to plain transformers.

SmolLM2-135M-Instruct (chat template, real tokenizer) and a tiny GPT-2 (learned positions, token ids only). One
server per model (SmolLM2's shared with other modules: tests/conftest.py `smollm2_server`).
"""

from __future__ import annotations

import pytest
import torch

import stip
from stip.client.sdk import Client, Detokenizer, StopMatcher
from stip.reference import plain_greedy
from stip.errors import KeyMismatchError
from tests.parties import ServerPipeline, serve

PROMPTS = ["Write a short story about a robot who learns to paint.",
           "Explain how photosynthesis works, step by step.",
           "List some tips for learning a new programming language."]
N = 32


@pytest.fixture(scope="module")
def smol_server(smollm2_server):
    return smollm2_server  # tests/conftest.py: shared with other modules


@pytest.fixture(scope="module")
def smol(smollm2_protected, smol_server):
    return Client(smollm2_protected / "client", smol_server.url)


@pytest.fixture(scope="module")
def reference(smollm2_plain, smol):
    """prompt -> plain transformers greedy token ids (chat template), computed once."""
    model, _ = smollm2_plain
    cache = {}

    def get(prompt: str, n: int = N) -> list[int]:
        if (prompt, n) not in cache:
            ids = smol.encode(messages=[{"role": "user", "content": prompt}])
            cache[prompt, n] = plain_greedy(model, ids, n, smol.bundle.eos_token_ids)
        return cache[prompt, n]

    return get


@pytest.fixture(scope="module")
def greedy(smol):
    """prompt -> the STIP greedy generation (top-k downlink), computed once."""
    cache = {}

    def get(prompt: str):
        if prompt not in cache:
            cache[prompt] = smol.generate(messages=_messages(prompt), max_tokens=N)
        return cache[prompt]

    return get


def _messages(prompt):
    return [{"role": "user", "content": prompt}]


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_chat_equals_plain_transformers(smol, smollm2_plain, reference, greedy, prompt):
    _, tok = smollm2_plain
    g = greedy(prompt)
    ref = reference(prompt)
    assert len(ref) >= 32
    assert g.token_ids == ref
    assert g.text == tok.decode(ref, skip_special_tokens=True)
    assert g.prompt_ids == tok.apply_chat_template(_messages(prompt), add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]
    assert g.finish_reason == ("stop" if ref[-1] in smol.bundle.eos_token_ids else "length")
    assert g.usage == {"prompt_tokens": len(g.prompt_ids), "completion_tokens": len(ref),
                       "total_tokens": len(g.prompt_ids) + len(ref)}
    t = g.timing
    assert t.steps == len(ref) - 1 and t.bytes_sent_per_token > 4 * 576
    # the server keeps its per-step time to itself (no --expose-timing): no made-up 0 ms, the round trip instead
    assert t.server_ms is None and t.rtt_ms_per_token > 0 and "not reported" in t.breakdown()
    assert t.client_ms_per_token > 0, t  # recorded; its cost is bench/end_to_end.py's client_ms, not judged here


@pytest.mark.slow
def test_stip_client_is_exported(smollm2_protected, smol_server):
    assert stip.Client is Client


@pytest.mark.slow
def test_logits_downlink_gives_the_same_tokens(smollm2_protected, smol_server, smol, greedy):
    full = Client(smollm2_protected / "client", smol_server.url, downlink="logits")
    g = full.generate(messages=_messages(PROMPTS[0]), max_tokens=N)
    assert g.token_ids == greedy(PROMPTS[0]).token_ids
    assert g.timing.bytes_received_per_token > 4 * smol.bundle.vocab_size  # all V logits came down
    assert greedy(PROMPTS[0]).timing.bytes_received_per_token < 1024


@pytest.mark.slow
def test_stream_yields_the_same_text(smol, greedy):
    g = greedy(PROMPTS[1])
    stream = smol.stream(messages=_messages(PROMPTS[1]), max_tokens=N)
    deltas = list(stream)
    assert len(deltas) > 10
    assert "".join(deltas) == g.text
    assert stream.generation.token_ids == g.token_ids


@pytest.mark.slow
def test_stop_strings(smol, greedy):
    full = greedy(PROMPTS[1]).text
    stop = full[len(full) // 2:len(full) // 2 + 6]
    cut = full[:full.index(stop)]
    g = smol.generate(messages=_messages(PROMPTS[1]), max_tokens=N, stop=["never appears", stop])
    assert g.text == cut and g.finish_reason == "stop"
    assert "".join(smol.stream(messages=_messages(PROMPTS[1]), max_tokens=N, stop=[stop])) == cut


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(smollm2_protected, smol_server, smol):
    kw = dict(messages=_messages("Tell me a joke."), max_tokens=10, temperature=0.9, top_p=0.95, top_k=40)
    a = smol.generate(seed=7, **kw)
    b = smol.generate(seed=7, **kw)
    assert a.token_ids == b.token_ids
    # top_k <= the downlink's k: the full-logits downlink samples the very same tokens
    full = Client(smollm2_protected / "client", smol_server.url, downlink="logits")
    assert full.generate(seed=7, **kw).token_ids == a.token_ids
    assert smol.generate(seed=8, **kw).token_ids != a.token_ids  # (for this seed pair)


@pytest.mark.slow
def test_prompt_and_ids_inputs(smol, smollm2_plain):
    model, tok = smollm2_plain
    ids = tok("The capital of France is")["input_ids"]
    ref = plain_greedy(model, ids, 8, smol.bundle.eos_token_ids)
    assert smol.generate(prompt="The capital of France is", max_tokens=8).token_ids == ref
    assert smol.generate(ids=ids, max_tokens=8).token_ids == ref
    with pytest.raises(ValueError):
        smol.generate(prompt="x", ids=ids)


@pytest.fixture(scope="module")
def tiny_servers(tiny_protected):
    """The two tiny servers below: the second starts while the first test runs (ServerPipeline)."""
    pipeline = ServerPipeline({name: (lambda out=tiny_protected(name)[1]: serve(out))
                               for name in ("llama-gqa-untied", "gpt2")})
    yield pipeline
    pipeline.close()


def test_mismatched_bundle_is_refused(tiny_protected, tiny_servers, tmp_path):
    plain, protected = tiny_protected("llama-gqa-untied")
    stip.protect(plain, tmp_path / "other", progress=False)  # same model, another protection: other keys
    with tiny_servers.use("llama-gqa-untied") as server:
        with pytest.raises(KeyMismatchError, match="bundle"):
            Client(tmp_path / "other" / "client", server.url)
        Client(protected / "client", server.url)  # the right one connects


def test_tiny_gpt2_learned_positions(tiny_protected, tiny_servers):
    from transformers import AutoModelForCausalLM

    plain_dir, protected = tiny_protected("gpt2")
    model = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
    prompt = [5, 17, 3, 88, 42, 9, 61, 23, 7, 70]
    with tiny_servers.use("gpt2") as server:
        for downlink in ("topk", "logits"):
            client = Client(protected / "client", server.url, downlink=downlink, k=16)
            g = client.generate(ids=prompt, max_tokens=40)
            assert g.token_ids == plain_greedy(model, prompt, 40), downlink
            assert g.text == ""  # no tokenizer in this bundle: ids only
        # the model has 64 learned positions: the generation ends there, with "length"
        g = client.generate(ids=prompt, max_tokens=500)
        assert g.finish_reason == "length" and len(g.token_ids) == 64 - len(prompt) + 1
        assert g.token_ids == plain_greedy(model, prompt, len(g.token_ids))


# ------------------------------------------------------------------ text handling, no server


@pytest.mark.slow
def test_detokenizer_multibyte(smollm2_protected):
    tok = stip.ClientBundle.load(smollm2_protected / "client").tokenizer
    g = torch.Generator().manual_seed(0)
    texts = ["Héllo wörld! 日本語のテキスト 🎉🎉 👩\u200d👩\u200d👧 café\n\n  x",
             "def f(x):\n    return x**2  # ✓"]
    streams = [tok(t)["input_ids"] for t in texts]
    streams += [torch.randint(0, tok.vocab_size, (30,), generator=g).tolist() for _ in range(30)]
    for ids in streams:
        d = Detokenizer(tok, tok("context: ")["input_ids"])
        deltas = [d.push(i) for i in ids] + [d.flush()]
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    d = Detokenizer(tok, [])
    assert all("\ufffd" not in d.push(i) for i in tok("🎉 日本")["input_ids"])


def test_stop_matcher():
    def run(stops, deltas):
        m = StopMatcher(stops)
        out = [m.push(x) for x in deltas]
        if not m.stopped:
            out.append(m.flush())
        return out, m.stopped

    assert run(["END"], ["abc E", "N", "D more"]) == (["abc ", "", ""], True)
    assert run(["END"], ["abc E", "N", "x"]) == (["abc ", "", "ENx", ""], False)
    assert run(["\n\n", "Q:"], ["a\n", "\nb"]) == (["a", ""], True)
    assert run([], ["a", "b"]) == (["a", "b", ""], False)
    assert run(["xy"], ["axyb"]) == (["a"], True)


@pytest.mark.slow
def test_chat_cli_one_shot_prints_the_plain_answer(smollm2_protected, smol_server, reference, smollm2_plain):
    """`stip chat --prompt` as its own process: the streamed answer is plain transformers' greedy answer."""
    import subprocess
    import sys

    _, tok = smollm2_plain
    r = subprocess.run([sys.executable, "-m", "stip.cli", "chat", str(smollm2_protected / "client"), "--server",
                        smol_server.url, "--prompt", PROMPTS[1], "--max-tokens", str(N)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert tok.decode(reference(PROMPTS[1]), skip_special_tokens=True).strip() in r.stdout
    assert "tok/s" in r.stderr  # the statistics line goes to stderr, the answer alone to stdout


@pytest.mark.slow
def test_expired_session_is_replayed_without_changing_the_output(smollm2_protected, reference):
    """A reader slower than the server's session TTL: the server frees the KV cache mid-generation, the client
    replays the context on a fresh session, and the text is still plain transformers' greedy text."""
    import time

    expired = "stip_sessions_closed_total{reason=\"expired\"} 1.0"
    with serve(smollm2_protected, "--session-ttl", "0.5") as server:
        client = Client(smollm2_protected / "client", server.url)
        stream = client.stream(messages=_messages(PROMPTS[2]), max_tokens=12)
        for i, _ in enumerate(stream):
            if i == 2:  # the generator is paused between two decode steps until the server expires the session
                deadline = time.monotonic() + 60  # a hang guard only
                while expired not in server.metrics():
                    assert time.monotonic() < deadline, "the idle session did not expire"
                    time.sleep(0.1)
        assert stream.generation.token_ids == reference(PROMPTS[2], 12)
        assert expired in server.metrics()
