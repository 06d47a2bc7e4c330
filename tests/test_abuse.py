"""A client with a valid key tries to exhaust the server; each attempt gets its clear 4xx/503 while another client's
honest session, running at the same time on the same real `stip serve` process, finishes its greedy generation
exactly as plain `generate` does."""

from __future__ import annotations

import re
import struct
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM
from websockets.sync.client import connect as _connect

from stip.client.bundle import ClientBundle
from stip.client.transport import Connection, Downlink, StipServerError, _legacy_kw
from stip.common import wire
from stip.reference import plain_greedy
from stip.server.auth import create_key
from tests.parties import serve

BUDGET = 150  # KV tokens for the whole server
ALL_LIMIT_TOKENS = 8  # positions="all" over at most this many tokens (V = 97)
PROMPT = [5, 17, 42, 8, 66, 3, 21]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def party(tiny_protected, tmp_path_factory):
    plain_dir, protected = tiny_protected("llama-gqa-untied")
    keys = tmp_path_factory.mktemp("keys") / "apikeys.json"
    k = {"honest": create_key(keys, "honest", metrics=True),
         "abuser": create_key(keys, "abuser", max_sessions=2, max_tokens=40),
         "bulk": create_key(keys, "bulk", max_sessions=64, max_tokens=10 * BUDGET)}  # may fill the server
    client = ClientBundle.load(protected / "client")
    with serve(protected, "--api-keys", str(keys), "--kv-budget-tokens", str(BUDGET), "--max-all-logits",
               str(ALL_LIMIT_TOKENS * client.vocab_size), threads=1) as server:
        plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
        yield server, client, plain, k


def raw_socket(server, key: str, session: str | None = None):
    url = server.url.replace("http", "ws") + wire.SESSION_PATH + (f"?session={session}" if session else "")
    ws = _connect(url, additional_headers={"Authorization": f"Bearer {key}"}, compression=None, max_size=None,
                  **_legacy_kw(_connect))
    hello, _ = wire.decode_frame(ws.recv(timeout=30))
    return ws, hello


def ask(ws, data: bytes) -> dict:
    ws.send(data)
    header, _ = wire.decode_frame(ws.recv(timeout=60))
    return header


def refused(fn) -> StipServerError:
    with pytest.raises(StipServerError) as e:
        fn()
    return e.value


def abuse(server, client: ClientBundle, k: dict, honest_id: str) -> dict[str, tuple[int, str]]:
    """Every abuse case in turn; case -> (status, message) the server answered."""
    d = client.hidden_size
    got: dict[str, tuple[int, str]] = {}
    abuser = Connection(server.url, token=k["abuser"])
    bulk = Connection(server.url, token=k["bulk"])

    # sessions beyond the client's quota (2): 429, the server's other clients unaffected
    a1, a2 = abuser.open_session(), abuser.open_session()
    e = refused(abuser.open_session)
    got["sessions beyond quota"] = (e.status, str(e))
    # KV tokens beyond the client's quota (40): 429, and nothing is reserved
    e = refused(lambda: a1.prefill(torch.randn(41, d)))
    got["tokens beyond quota"] = (e.status, str(e))
    assert a1.prefill(torch.randn(40, d)).position == 40  # exactly the quota is fine
    e = refused(lambda: a2.prefill(torch.randn(1, d)))
    got["one token past quota"] = (e.status, str(e))
    a1.close()  # returns its 40 tokens
    assert a2.prefill(torch.randn(3, d)).position == 3
    # positions="all" beyond the bound, whatever the downlink: 413 naming the limit, before any compute
    for dl in (Downlink("topk", 1), Downlink("logits")):
        e = refused(lambda: a2.prefill(torch.randn(ALL_LIMIT_TOKENS + 1, d), positions="all", downlink=dl))
        got[f"all positions beyond the bound ({dl.kind})"] = (e.status, str(e))
    assert a2.prefill(torch.randn(ALL_LIMIT_TOKENS, d), positions="all", downlink=Downlink("topk", 1)).position \
        == 3 + ALL_LIMIT_TOKENS
    a2.close()
    # the global KV budget: a client with no quota of its own fills the server, then gets 503 (retry later)
    b1, b2 = bulk.open_session(), bulk.open_session()
    assert b1.prefill(torch.randn(100, d)).position == 100
    e = refused(lambda: b2.prefill(torch.randn(60, d)))  # 160 > 150 whatever the honest session holds
    got["prefill beyond the KV budget"] = (e.status, str(e))
    b1.close()
    assert b2.prefill(torch.randn(60, d)).position == 60  # the budget came back with the closed session
    b2.close()
    # another client's session cannot be resumed (or even seen)
    e = refused(lambda: abuser.open_session(resume=honest_id))
    got["resume another client's session"] = (e.status, str(e))
    # malformed headers on a raw socket: 400 each, the socket and its session stay usable
    ws, _ = raw_socket(server, k["abuser"])
    nested = b'{"op":' + b'{"a":' * 5_000 + b"1" + b"}" * 5_000 + b"}"  # within the 64 KB header limit
    frames = {
        "deeply nested header": struct.pack(">I", len(nested)) + nested,
        "deeply nested list": struct.pack(">I", 60_000) + b"[" * 60_000,
        "header not an object": struct.pack(">I", 7) + b'"hello"',
        "garbage header": b"\x00\x00\x00\x08\xde\xad\xbe\xef{{{{",
        "op of the wrong type": wire.encode_frame({"op": ["prefill"]}),
        "dtype of the wrong type": wire.encode_frame({"op": "prefill", "dtype": {"x": 1}, "shape": [1, d]}),
        "downlink of the wrong type": wire.encode_frame({"op": "prefill", "shape": [1, d], "downlink": [1]},
                                                        wire.tensor_bytes(torch.randn(1, d))),
    }
    for name, data in frames.items():
        h = ask(ws, data)
        assert h["ok"] is False and not h.get("fatal"), (name, h)
        got[name] = (h["status"], h["error"])
    h = ask(ws, wire.encode_frame({"op": "prefill", "shape": [2, d]}, wire.tensor_bytes(torch.randn(2, d))))
    assert h["ok"] and h["position"] == 2
    assert ask(ws, wire.encode_frame({"op": "close"}))["kind"] == "closed"
    ws.close()
    return got


def test_each_abuse_gets_its_clear_error_while_an_honest_session_finishes(party):
    server, client, plain, k = party
    honest = Connection(server.url, token=k["honest"])
    started, abused = threading.Event(), threading.Event()
    result: dict = {}

    def run_honest():
        try:
            with honest.open_session() as s:
                result["id"] = s.id
                r = s.prefill(client.embed(torch.tensor(PROMPT)), downlink=Downlink("topk", 4))
                started.set()
                out = [int(client.plain_ids(r.indices[-1, 0]))]
                while len(out) < NEW_TOKENS:
                    if len(out) == NEW_TOKENS - 1:
                        abused.wait(120)  # the session stays open through every abuse case
                    r = s.decode(client.embed(torch.tensor([out[-1]]), start=s.position), downlink=Downlink("topk", 4))
                    out.append(int(client.plain_ids(r.indices[-1, 0])))
                result["out"] = out
        except BaseException as e:  # pragma: no cover - reported below
            result["error"] = e
            started.set()

    t = threading.Thread(target=run_honest)
    t.start()
    try:
        assert started.wait(60)
        got = abuse(server, client, k, result.get("id", "x"))
    finally:
        abused.set()
        t.join(120)
    assert "error" not in result, result.get("error")
    assert result["out"] == plain_greedy(plain, PROMPT, NEW_TOKENS)

    expected = {
        "sessions beyond quota": (429, "quota of 2"),
        "tokens beyond quota": (429, "quota of 40"),
        "one token past quota": (429, "token quota"),
        "all positions beyond the bound (topk)": (413, "max_all_logits"),
        "all positions beyond the bound (logits)": (413, f"at most {ALL_LIMIT_TOKENS} tokens"),
        "prefill beyond the KV budget": (503, "retry"),
        "resume another client's session": (404, "unknown"),
        "deeply nested header": (400, "nests deeper"),
        "deeply nested list": (400, "nests deeper"),
        "header not an object": (400, "object"),
        "garbage header": (400, "JSON"),
        "op of the wrong type": (400, "unknown op"),
        "dtype of the wrong type": (422, "dtype"),
        "downlink of the wrong type": (422, "downlink"),
    }
    for name, (status, words) in expected.items():
        assert got[name][0] == status and words.lower() in got[name][1].lower(), (name, got[name])
    assert "server full" in got["prefill beyond the KV budget"][1]

    assert server.alive and "Traceback" not in server.log()
    m = server.metrics(k["honest"])
    for reason in ("client_sessions", "client_tokens", "kv_budget"):
        assert re.search(rf'^stip_admission_refused_total\{{reason="{reason}"\}} [1-9]', m, re.M), reason
    assert re.search(rf"^stip_kv_budget_tokens {BUDGET}(\.0)?$", m, re.M)
    assert re.search(r"^stip_kv_budget_used_tokens 0(\.0)?$", m, re.M)  # everything was given back
    assert not re.search(r'stip_errors_total\{status="500"\} [1-9]', m)
    info = honest.info()
    assert info["kv_budget_tokens"] == BUDGET and info["sessions"] == 0 and info["kv_tokens"] == 0
    assert info["max_all_logits"] == ALL_LIMIT_TOKENS * client.vocab_size


def test_concurrent_prefills_cannot_overshoot_the_budget(party):
    """Many prefills in flight at once: admitted tokens never pass the budget, the rest get 503."""
    server, client, _, k = party
    conn = Connection(server.url, token=k["bulk"])
    sessions = [conn.open_session() for _ in range(6)]
    outcomes: list = [None] * len(sessions)

    def go(i):
        try:
            outcomes[i] = sessions[i].prefill(torch.randn(40, client.hidden_size)).position
        except StipServerError as e:
            outcomes[i] = e.status

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == [40, 40, 40, 503, 503, 503]  # 3 x 40 = 120 <= 150 < 160
    for s in sessions:
        s.close()


def test_admission_rules():
    """The bookkeeping alone: a refusal reserves nothing, closing returns everything, the rate window slides."""
    from stip.server.budget import Admission, AdmissionError, Quota, default_budget_tokens

    adm = Admission(budget_tokens=100, max_sessions=3)
    q = Quota(max_sessions=2, max_tokens=60, max_tokens_per_minute=80)
    adm.open_session("a", q)
    adm.open_session("a", q)
    with pytest.raises(AdmissionError) as e:
        adm.open_session("a", q)
    assert (e.value.status, e.value.reason) == (429, "client_sessions")
    adm.open_session("b", Quota())
    with pytest.raises(AdmissionError) as e:
        adm.open_session("c", Quota())
    assert (e.value.status, e.value.reason) == (503, "server_sessions")
    adm.reserve("a", q, 50, now=0.0)
    with pytest.raises(AdmissionError) as e:
        adm.reserve("a", q, 11, now=1.0)
    assert e.value.reason == "client_tokens" and adm.used == 50
    adm.release("a", 50)
    adm.reserve("a", q, 30, now=2.0)  # 80 tokens in this minute: the rate quota is spent
    with pytest.raises(AdmissionError) as e:
        adm.reserve("a", q, 1, now=30.0)
    assert e.value.reason == "client_rate" and "retry in 30 s" in str(e.value)
    adm.reserve("a", q, 1, now=61.0)  # the first 50 left the window
    with pytest.raises(AdmissionError) as e:
        adm.reserve("b", Quota(), 70, now=61.0)
    assert (e.value.status, e.value.reason) == (503, "kv_budget") and adm.used == 31
    adm.close_session("a", 31)
    adm.close_session("a", 0)
    assert adm.used == 0 and adm.sessions == 1 and adm.usage("a").tokens == 0
    assert 1 <= default_budget_tokens(46080, ceiling_tokens=64 * 4096) <= 64 * 4096
    rate = Admission(budget_tokens=1000, max_sessions=5)
    q = Quota(max_tokens_per_minute=100)
    rate.reserve("r", q, 60, now=0.0)
    rate.reserve("r", q, 40, now=10.0)
    for n, wait in ((50, 40), (70, 50)):  # until enough of the minute's tokens have left the window
        with pytest.raises(AdmissionError) as e:
            rate.reserve("r", q, n, now=20.0)
        assert f"retry in {wait} s" in str(e.value)
