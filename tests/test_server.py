"""The model server as a real process on loopback: exactness, downlinks, validation, auth, limits, expiry, metrics.

One server subprocess per tiny model for the whole module; extra servers only where a flag differs.
"""

from __future__ import annotations

import re
import struct
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM
from websockets.sync.client import connect as _connect

from stip.client.bundle import ClientBundle
from stip.client.transport import (Connection, Downlink, StipAuthError, StipConnectionError, StipServerError,
                                   _legacy_kw)
from stip.common import wire
from stip.reference import plain_greedy
from tests.parties import ServerPipeline, run_serve_expect_exit, serve

TOKEN = "test-token-7f3a"
PROMPTS = [[5, 17, 42, 8, 66, 3, 21], [90, 1, 2], [33, 33, 12, 70, 4, 9, 15, 27, 60], [7]]
NEW_TOKENS = 12


def connect(url, **kw):
    return _connect(url, **kw, **_legacy_kw(_connect))


class Party:
    """A running server plus what the tests need around it: the client bundle and the plain model."""

    def __init__(self, server, plain_dir, protected_dir):
        self.server = server
        self.client = ClientBundle.load(protected_dir / "client")
        self.plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
        self.conn = Connection(server.url, token=TOKEN)
        self._ref: dict = {}

    def reference(self, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
        key = (tuple(prompt), n)
        if key not in self._ref:
            self._ref[key] = plain_greedy(self.plain, prompt, n)
        return self._ref[key]


@pytest.fixture(scope="module")
def servers(tiny_protected):
    """The module's servers in the order its tests first use them; the next starts while one is used."""
    gpt2, llama = tiny_protected("gpt2")[1], tiny_protected("llama-gqa-untied")[1]
    pipeline = ServerPipeline({
        "gpt2": lambda: serve(gpt2, token=TOKEN, threads=1),
        "llama": lambda: serve(llama, "--expose-timing", token=TOKEN, threads=1),
        "limits": lambda: serve(gpt2, "--session-ttl", "1", "--max-sessions", "2", token=TOKEN, threads=1)})
    yield pipeline
    pipeline.close()


@pytest.fixture(scope="module")
def gpt2(tiny_protected, servers):
    plain_dir, protected_dir = tiny_protected("gpt2")
    with servers.use("gpt2") as server:
        yield Party(server, plain_dir, protected_dir)


@pytest.fixture(scope="module")
def llama(tiny_protected, servers):
    plain_dir, protected_dir = tiny_protected("llama-gqa-untied")
    with servers.use("llama") as server:
        yield Party(server, plain_dir, protected_dir)


def next_token(client: ClientBundle, r) -> int:
    if r.logits is not None:
        return int(client.plain_logits(r.logits[-1]).argmax())
    return int(client.plain_ids(r.indices[-1, 0]))


def remote_greedy(session, client: ClientBundle, prompt: list[int], n: int, downlink=Downlink(),
                  dtype=torch.float32, barrier: threading.Barrier | None = None) -> list[int]:
    r = session.prefill(client.embed(torch.tensor(prompt)), downlink=downlink, dtype=dtype)
    assert r.position == len(prompt) == session.position
    out = []
    for _ in range(n):
        out.append(next_token(client, r))
        if len(out) == n:
            break
        if barrier is not None:
            barrier.wait(timeout=60)
        r = session.decode(client.embed(torch.tensor([out[-1]]), start=session.position), downlink=downlink,
                           dtype=dtype)
    assert session.position == len(prompt) + n - 1
    return out


# ------------------------------------------------------------------ exactness


@pytest.mark.parametrize("model", ["gpt2", "llama"])
@pytest.mark.parametrize("downlink", [Downlink("topk", 5), Downlink("logits")], ids=["topk", "logits"])
def test_greedy_matches_plain_generate(request, model, downlink):
    party = request.getfixturevalue(model)
    for prompt in PROMPTS[:2]:
        with party.conn.open_session() as s:
            assert remote_greedy(s, party.client, prompt, NEW_TOKENS, downlink) == party.reference(prompt)


def test_step_results_and_downlinks_agree(gpt2):
    c = gpt2.client
    x = c.embed(torch.tensor(PROMPTS[0]))
    with gpt2.conn.open_session() as s:
        full = s.prefill(x, positions="all", downlink=Downlink("logits"))
    with gpt2.conn.open_session() as s:
        top = s.prefill(x, positions="all", downlink=Downlink("topk", 7))
        last = s.decode(c.embed(torch.tensor([3]), start=len(PROMPTS[0])), downlink=Downlink("logits"))
    t = len(PROMPTS[0])
    assert full.logits.shape == (t, c.vocab_size) and full.logits.dtype == torch.float32
    assert full.indices is None and full.values is None
    assert top.indices.shape == top.values.shape == (t, 7) and top.indices.dtype == torch.int64
    assert top.logits is None and top.position == t and last.position == t + 1 and last.logits.shape == (1, c.vocab_size)
    # top-k pairs are exactly the largest permuted logits, in order
    v, i = full.logits.topk(7, dim=-1)
    assert torch.equal(top.values, v) and torch.equal(top.indices, i)
    # ... and carry each row's logsumexp over all V logits (exact log-probabilities: values - logsumexp)
    assert full.logsumexp is None and torch.allclose(top.logsumexp, torch.logsumexp(full.logits, -1), atol=1e-5)
    # the full logits, un-permuted, equal the plain model's
    ref = gpt2.plain(input_ids=torch.tensor([PROMPTS[0]])).logits[0]
    assert torch.allclose(c.plain_logits(full.logits), ref, atol=1e-4)
    # accounting: sizes match the wire format
    assert 4 < full.bytes_received - t * c.vocab_size * 4 < 400  # length prefix + small JSON header
    assert 4 < top.bytes_received - t * (7 * 8 + 4) < 400
    assert full.bytes_sent > x.numel() * 4 and full.rtt_ms > 0


def test_server_time_is_reported_only_when_the_operator_exposes_it(gpt2, llama):
    """Per-step server times would let any key holder time what shared caches hold (other clients' prefixes): by
    default no reply carries one; `stip serve --expose-timing` (the llama server here) turns them on."""
    for party, exposed in ((gpt2, False), (llama, True)):
        with party.conn.open_session() as s:
            r = s.prefill(party.client.embed(torch.tensor(PROMPTS[0])), downlink=Downlink("topk", 4))
        assert r.rtt_ms > 0
        if exposed:
            assert r.server_ms is not None and 0 < r.server_ms <= r.rtt_ms
        else:
            assert r.server_ms is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(llama, dtype):
    c = llama.client
    x = c.embed(torch.tensor(PROMPTS[0]))
    with llama.conn.open_session() as s:
        ref = s.prefill(x, downlink=Downlink("logits"))
    with llama.conn.open_session() as s:
        half = s.prefill(x, downlink=Downlink("logits"), dtype=dtype)
        assert half.bytes_sent < ref.bytes_sent * 0.6
        out = s.decode(c.embed(torch.tensor([4]), start=s.position), dtype=dtype)
        assert out.position == len(PROMPTS[0]) + 1
    rounded = x.to(dtype).float()
    with llama.conn.open_session() as s:  # the server computes on exactly the rounded values
        assert torch.equal(s.prefill(rounded, downlink=Downlink("logits")).logits, half.logits)
    assert (half.logits - ref.logits).abs().max() < 0.05 * ref.logits.abs().max()


def test_concurrent_interleaved_sessions(llama):
    n = len(PROMPTS)
    barrier = threading.Barrier(n)
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(i):
        try:
            with llama.conn.open_session() as s:
                dl = Downlink("topk", 3) if i % 2 else Downlink("logits")
                results[i] = remote_greedy(s, llama.client, PROMPTS[i], NEW_TOKENS, dl, barrier=barrier)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in range(n):
        assert results[i] == llama.reference(PROMPTS[i]), f"session {i}"


def test_resume_session_on_a_new_socket(gpt2):
    c = gpt2.client
    prompt = PROMPTS[2]
    s = gpt2.conn.open_session()
    r = s.prefill(c.embed(torch.tensor(prompt)), downlink=Downlink("topk", 1))
    s.detach()
    assert not s.connected
    with pytest.raises(StipConnectionError):
        s.decode(c.embed(torch.tensor([1]), start=len(prompt)))
    with gpt2.conn.open_session(resume=s.id) as s2:
        assert s2.id == s.id and s2.position == len(prompt)
        out = [next_token(c, r)]
        for _ in range(NEW_TOKENS - 1):
            r = s2.decode(c.embed(torch.tensor([out[-1]]), start=s2.position), downlink=Downlink("topk", 1))
            out.append(next_token(c, r))
    assert out == gpt2.reference(prompt)
    with pytest.raises(StipServerError) as e:  # closed sessions are gone
        gpt2.conn.open_session(resume=s.id)
    assert e.value.status == 404


# ------------------------------------------------------------------ validation


class Raw:
    """A bare socket speaking frames by hand, for requests the SDK would never send."""

    def __init__(self, party, session: str | None = None):
        url = party.server.url.replace("http", "ws") + wire.SESSION_PATH + (f"?session={session}" if session else "")
        self.ws = connect(url, additional_headers={"Authorization": f"Bearer {TOKEN}"}, compression=None,
                          max_size=None)
        self.hello = self.recv()[0]
        self.d = party.client.hidden_size

    def recv(self):
        return wire.decode_frame(self.ws.recv(timeout=30))

    def ask(self, data):
        self.ws.send(data)
        return self.recv()

    def step(self, op="prefill", x=None, **header):
        x = torch.randn(3 if op == "prefill" else 1, self.d) if x is None else x
        h = {"op": op, "dtype": "float32", "shape": list(x.shape), "downlink": {"kind": "topk", "k": 2}, **header}
        return self.ask(wire.encode_frame(h, wire.tensor_bytes(x)))

    def close(self):
        self.ws.close()


def test_bad_requests_get_clear_4xx_and_the_socket_stays_usable(gpt2):
    raw = Raw(gpt2)
    d = raw.d
    good = wire.tensor_bytes(torch.randn(2, d))

    def frame(**h):
        base = {"op": "prefill", "dtype": "float32", "shape": [2, d], "downlink": {"kind": "logits"}}
        base.update(h)
        return wire.encode_frame({k: v for k, v in base.items() if v is not None}, good)

    nan = torch.randn(2, d)
    nan[1, 3] = float("nan")
    inf = torch.randn(1, d)
    inf[0, 0] = float("inf")
    cases = {
        "decode before prefill": (wire.encode_frame({"op": "decode", "dtype": "float32", "shape": [1, d]},
                                                    good[: d * 4]), 409, "decode before prefill"),
        "wrong hidden size": (wire.encode_frame({"op": "prefill", "dtype": "float32", "shape": [2, d + 1]},
                                                wire.tensor_bytes(torch.randn(2, d + 1))), 422, "hidden size"),
        "unknown dtype": (frame(dtype="float64"), 422, "dtype"),
        "dtype/bytes mismatch": (frame(dtype="float16"), 422, "bytes"),
        "shape/bytes mismatch": (frame(shape=[3, d]), 422, "bytes"),
        "bad shape": (frame(shape="2x48"), 422, "shape"),
        "empty prefill": (wire.encode_frame({"op": "prefill", "shape": [0, d]}), 422, "at least one"),
        "NaN": (wire.encode_frame({"op": "prefill", "shape": [2, d]}, wire.tensor_bytes(nan)), 422, "NaN"),
        "Inf decode shape [d]": (wire.encode_frame({"op": "prefill", "shape": [1, d]}, wire.tensor_bytes(inf)), 422,
                                 "Inf"),
        "unknown op": (frame(op="train"), 400, "unknown op"),
        "bad positions": (frame(positions="some"), 422, "positions"),
        "bad downlink": (frame(downlink={"kind": "probs"}), 422, "downlink"),
        "bad k": (frame(downlink={"kind": "topk", "k": 0}), 422, "k"),
        "garbage bytes": (b"\x00\x00\x00\x05hello world", 400, "JSON"),
        "short frame": (b"\x01", 400, "shorter"),
        "header past end": (struct.pack(">I", 1000) + b"{}", 400, "past the end"),
        "huge header length": (struct.pack(">I", 1 << 30) + b"{}", 400, "limit"),
        "header not an object": (struct.pack(">I", 2) + b"[]", 400, "object"),
        "bad UTF-8": (struct.pack(">I", 2) + b"\xff\xfe", 400, "UTF-8"),
        "oversized message": (b"\x00" * (gpt2.server.info()["max_message_bytes"] + 1), 413, "limit"),
        "sequence past max_seq_len": (wire.encode_frame({"op": "prefill", "shape": [65, d]},
                                                        wire.tensor_bytes(torch.randn(65, d))), 413, "max_seq_len"),
    }
    for name, (data, status, words) in cases.items():
        header, payload = raw.ask(data)
        assert header["ok"] is False and header["status"] == status, (name, header)
        assert words.lower() in header["error"].lower(), (name, header)
        assert not header.get("fatal") and len(payload) == 0, name
    raw.ws.send("a text frame")
    header, _ = raw.recv()
    assert header["status"] == 400 and "binary" in header["error"]
    # the same socket still serves its session, from an empty cache: nothing above touched it
    header, payload = raw.step()
    assert header["ok"] and header["position"] == 3 and header["shape"] == [1, 2]
    assert len(payload) == 2 * 8 + 4  # indices, values, logsumexp
    header, _ = raw.step("decode", torch.randn(d))
    assert header["ok"] and header["position"] == 4
    raw.close()
    # and a fresh session is fine too
    with gpt2.conn.open_session() as s:
        assert remote_greedy(s, gpt2.client, PROMPTS[0], NEW_TOKENS) == gpt2.reference(PROMPTS[0])
    errors = gpt2.server.metrics()
    assert re.search(r'stip_errors_total\{status="422"\} [1-9]', errors)
    assert re.search(r'stip_errors_total\{status="400"\} [1-9]', errors)


def test_sequence_limit_counts_the_cache(gpt2):
    c = gpt2.client
    limit = gpt2.server.info()["max_seq_len"]  # gpt2 tiny: 64 learned positions
    assert limit == 64
    with gpt2.conn.open_session() as s:
        s.prefill(torch.randn(limit - 1, c.hidden_size))
        s.decode(torch.randn(c.hidden_size))
        with pytest.raises(StipServerError) as e:
            s.decode(torch.randn(c.hidden_size))
        assert e.value.status == 413 and "max_seq_len" in str(e.value)
        assert s.position == limit


def test_message_beyond_protocol_limit_closes_only_that_socket(gpt2):
    raw = Raw(gpt2)
    raw.ws.send(b"\x00" * (3 * gpt2.server.info()["max_message_bytes"]))
    with pytest.raises(Exception):
        raw.recv()
    with gpt2.conn.open_session() as s:
        assert remote_greedy(s, gpt2.client, PROMPTS[1], 3) == gpt2.reference(PROMPTS[1])[:3]


def test_unknown_session_is_404(gpt2):
    with pytest.raises(StipServerError) as e:
        gpt2.conn.open_session(resume="no-such-session")
    assert e.value.status == 404 and "unknown" in str(e.value)
    url = gpt2.server.url.replace("http", "ws") + wire.SESSION_PATH + "?session=nope"
    ws = connect(url, additional_headers={"Authorization": f"Bearer {TOKEN}"})
    header, _ = wire.decode_frame(ws.recv(timeout=10))
    assert header == {"ok": False, "status": 404, "error": "unknown or expired session", "fatal": True}
    ws.close()


def test_client_vanishing_mid_step_leaves_a_resumable_session(gpt2):
    raw = Raw(gpt2)
    sid = raw.hello["session"]
    x = torch.randn(5, raw.d)
    raw.ws.send(wire.encode_frame({"op": "prefill", "shape": [5, raw.d]}, wire.tensor_bytes(x)))
    raw.ws.close()  # gone before the reply
    with gpt2.conn.open_session(resume=sid) as s:
        assert s.position == 5
        assert s.decode(torch.randn(raw.d)).position == 6
    assert gpt2.server.alive and "Traceback" not in gpt2.server.log()


def test_session_in_use_is_409(gpt2):
    with gpt2.conn.open_session() as s:
        with pytest.raises(StipServerError) as e:
            gpt2.conn.open_session(resume=s.id)
        assert e.value.status == 409
        s.prefill(torch.randn(2, gpt2.client.hidden_size))


# ------------------------------------------------------------------ auth


def test_token_required(gpt2):
    url = gpt2.server.url
    with pytest.raises(StipAuthError) as e:
        Connection(url, token="").open_session()
    assert e.value.status == 401 and "token" in str(e.value)
    with pytest.raises(StipAuthError) as e:
        Connection(url, token="wrong").open_session()
    assert e.value.status == 403
    for path in ("/metrics", "/v1/info"):
        for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 403),
                                ({"Authorization": "Basic x"}, 401)):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(urllib.request.Request(url + path, headers=headers), timeout=10)
            assert e.value.code == status, (path, headers)
    health = Connection(url, token="").health()  # /health is open: up, and the engine's load, nothing else
    assert health["status"] == "ok" and set(health) == {"status", "engine", "mode", "batch_size", "queue"}
    with pytest.raises(StipAuthError):
        Connection(url, token="").info()
    with pytest.raises(StipAuthError):
        Connection(url, token="wrong").metrics()
    assert "stip_sessions_active" in Connection(url, token=TOKEN).metrics()


def test_no_token_refuses_public_bind(tiny_protected):
    _, protected = tiny_protected("gpt2")
    r = run_serve_expect_exit(protected, host="0.0.0.0")
    assert r.returncode != 0
    assert "refusing" in r.stderr and "token" in r.stderr, r.stderr


def test_serve_checks_its_options_before_the_slow_imports():
    """`stip serve` refuses a bad option before it imports torch or FastAPI (its checks and --vllm-arg parsing are
    light), so a refusal answers at once; its dtype names are the wire's."""
    import subprocess
    import sys

    from stip.server.serve_checks import DTYPE_NAMES

    assert set(DTYPE_NAMES) == set(wire.DTYPES)
    light = ("import sys, stip.cli.server, stip.server.serve_checks, stip.server.vllm_options; "
             "print(sorted({'torch', 'fastapi', 'transformers'} & set(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", light], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_connection_refused_is_clear():
    from tests.parties import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StipConnectionError, match="cannot reach"):
        Connection(url, timeout=5).open_session()
    with pytest.raises(StipConnectionError, match="cannot reach"):
        Connection(url, timeout=5).health()


# ------------------------------------------------------------------ limits, expiry, health, metrics


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def test_limits_and_expiry(tiny_protected, servers):
    _, protected = tiny_protected("gpt2")
    client = ClientBundle.load(protected / "client")
    with servers.use("limits") as server:  # --session-ttl 1 --max-sessions 2
        conn = Connection(server.url, token=TOKEN)
        a, b = conn.open_session(), conn.open_session()
        with pytest.raises(StipServerError) as e:
            conn.open_session()
        assert e.value.status == 503 and "server full" in str(e.value)  # the server's limit: retry later
        a.close()
        c = conn.open_session()  # room again
        a.close()  # idempotent
        b.prefill(client.embed(torch.tensor(PROMPTS[0])))
        c.prefill(client.embed(torch.tensor(PROMPTS[1])))
        c.detach()
        m = server.metrics()
        assert _metric(m, "stip_kv_caches_live") == 2 and _metric(m, "stip_sessions_active") == 2
        assert _metric(m, "stip_kv_cache_tokens") == len(PROMPTS[0]) + len(PROMPTS[1])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _metric(server.metrics(), "stip_sessions_active") > 0:
            time.sleep(0.2)
        m = server.metrics()
        assert _metric(m, "stip_kv_caches_live") == 0 and _metric(m, "stip_sessions_active") == 0
        assert _metric(m, "stip_kv_cache_tokens") == 0
        assert _metric(m, 'stip_sessions_closed_total{reason="expired"}') == 2
        assert server.info()["sessions"] == 0
        with pytest.raises(StipServerError) as e:  # the attached but idle socket learns on its next step
            b.decode(client.embed(torch.tensor([1]), start=b.position))
        assert e.value.status == 404 and "expired" in str(e.value)
        with pytest.raises(StipServerError) as e:
            conn.open_session(resume=c.id)
        assert e.value.status == 404
        with conn.open_session() as s:  # the server is fine
            s.prefill(client.embed(torch.tensor(PROMPTS[1])))


def test_health_and_metrics_format(gpt2):
    health = gpt2.server.health()  # open to anyone: "up" and the engine's load, nothing per client
    assert health["status"] == "ok" and set(health) == {"status", "engine", "mode", "batch_size", "queue"}
    assert health["mode"] == "round-trip" and health["engine"].startswith("transformers")
    h = gpt2.server.info()
    c = gpt2.client
    assert h["status"] == "ok" and h["bundle_id"] == c.bundle_id and h["model_type"] == "gpt2"
    assert h["hidden_size"] == c.hidden_size and h["vocab_size"] == c.vocab_size
    assert isinstance(h["sessions"], int) and h["client"] == "token"
    with gpt2.conn.open_session() as s:
        s.prefill(c.embed(torch.tensor(PROMPTS[0])))
        s.decode(c.embed(torch.tensor([1]), start=s.position))
        assert gpt2.server.info()["sessions"] >= 1
    text = gpt2.server.metrics()
    for name in ("stip_sessions_active", "stip_kv_caches_live", "stip_kv_cache_tokens"):
        assert re.search(rf"^# TYPE {name} gauge$", text, re.M), name
    assert re.search(r"^# TYPE stip_tokens_processed_total counter$", text, re.M)
    assert re.search(r'^stip_tokens_processed_total\{phase="prefill"\} [1-9]', text, re.M)
    assert re.search(r'^stip_tokens_processed_total\{phase="decode"\} [1-9]', text, re.M)
    assert re.search(r"^# TYPE stip_step_seconds histogram$", text, re.M)
    assert re.search(r'^stip_step_seconds_bucket\{le="\+Inf",op="decode"\} [1-9]', text, re.M)
    assert re.search(r"^# TYPE stip_errors_total counter$", text, re.M)
    # every sample line parses as `name{labels} value`
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r'[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? [-+0-9.eEinfNa]+', line), line


def test_logs_carry_no_tensor_values(gpt2):
    log = gpt2.server.log()
    assert "tensor(" not in log and not re.search(r"\d\.\d{4}", log.split("Uvicorn running")[-1])
