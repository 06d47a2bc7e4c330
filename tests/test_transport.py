"""The client transport and the wire format: frames, tensor bytes, URLs, chunked prefill, resume, failures."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from stip.client.bundle import ClientBundle
from stip.client.transport import (Connection, Downlink, StepResult, StipConnectionError, StipServerError,
                                   _http_url, _ws_url)
from stip.common import wire
from stip.reference import plain_greedy
from tests.parties import serve

TOKEN = "transport-token"

# ------------------------------------------------------------------ wire format (no server)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64])
def test_tensor_bytes_round_trip(dtype):
    t = (torch.randn(5, 7) * 100).to(dtype)
    raw = wire.tensor_bytes(t)
    assert len(raw) == t.numel() * t.element_size()
    back = wire.tensor_from_bytes(raw, dtype, [5, 7])
    assert back.dtype == dtype and torch.equal(back, t)
    back[0, 0] = 1  # an owned, writable tensor
    assert wire.tensor_bytes(torch.tensor([1.0, -2.0])) == struct.pack("<2f", 1.0, -2.0)  # little-endian


def test_non_contiguous_tensors_are_sent_in_c_order():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert torch.equal(wire.tensor_from_bytes(wire.tensor_bytes(t), torch.float32, [4, 3]), t)


@settings(max_examples=50, deadline=None)
@given(header=st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=8), st.none()),
                              max_size=5),
       payload=st.binary(max_size=64))
def test_frame_round_trip(header, payload):
    h, p = wire.decode_frame(wire.encode_frame(header, payload))
    assert h == header and bytes(p) == payload


def test_frame_layout():
    frame = wire.encode_frame({"op": "decode"}, b"\x01\x02")
    head = b'{"op":"decode"}'
    assert frame == struct.pack(">I", len(head)) + head + b"\x01\x02"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80))
def test_garbage_never_crashes_the_decoder(data):
    try:
        header, payload = wire.decode_frame(data)
    except wire.WireError as e:
        assert e.status == 400 and str(e)
    else:
        assert isinstance(header, dict)


def test_urls():
    assert _ws_url("http://h:1", "/v1/session") == "ws://h:1/v1/session"
    assert _ws_url("https://h/api/", "/v1/session", {"session": "a b"}) == "wss://h/api/v1/session?session=a+b"
    assert _ws_url("127.0.0.1:8000", "/x") == "ws://127.0.0.1:8000/x"
    assert _http_url("ws://h:1/", "/health") == "http://h:1/health"
    with pytest.raises(ValueError):
        _ws_url("ftp://h", "/x")


def test_downlink_header():
    assert Downlink().header() == {"kind": "topk", "k": 64}
    assert Downlink("logits").header() == {"kind": "logits"}
    with pytest.raises(ValueError):
        Downlink("probs").header()


# ------------------------------------------------------------------ against a server


@pytest.fixture(scope="module")
def party(tiny_protected):
    """A Qwen2 (QKV biases, tied) server with a small message limit, so long prompts must be chunked."""
    plain_dir, protected = tiny_protected("qwen2-bias-tied")
    with serve(protected, "--max-message-size", "4KB", token=TOKEN, threads=1) as server:
        client = ClientBundle.load(protected / "client")
        plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
        yield server, client, plain, Connection(server.url, token=TOKEN)


def test_session_basics(party):
    server, client, plain, conn = party
    assert conn.info()["sessions"] == 0
    prompt = [3, 14, 15, 92, 65]
    with conn.open_session() as s:
        assert s.id and s.position == 0 and conn.info()["sessions"] == 1
        r = s.prefill(client.embed(torch.tensor(prompt)), downlink=Downlink("topk", 4))
        assert isinstance(r, StepResult) and r.position == s.position == 5
        assert r.indices.shape == (1, 4) and r.values.shape == (1, 4) and r.logits is None
        assert r.server_ms is None and r.rtt_ms > 0  # no server time on the wire unless --expose-timing
        assert s.bytes_sent == r.bytes_sent and s.bytes_received > r.bytes_received  # + the hello frame
        r2 = s.decode(client.embed(torch.tensor([int(client.plain_ids(r.indices[0, 0]))]), start=5)[0])
        assert r2.position == 6 and r2.indices.shape == (1, 64)
        assert s.bytes_sent == r.bytes_sent + r2.bytes_sent
        ref = plain_greedy(plain, prompt, 2)
        assert [int(client.plain_ids(r.indices[0, 0])), int(client.plain_ids(r2.indices[0, 0]))] == ref
    assert conn.info()["sessions"] == 0 and not s.connected
    s.close()  # idempotent
    with pytest.raises(StipConnectionError, match="not connected"):
        s.decode(torch.zeros(client.hidden_size))


def test_client_side_argument_checks(party):
    _, client, _, conn = party
    d = client.hidden_size
    with conn.open_session() as s:
        with pytest.raises(ValueError):
            s.prefill(torch.zeros(d))
        with pytest.raises(ValueError):
            s.prefill(torch.zeros(2, d), positions="first")
        with pytest.raises(ValueError):
            s.decode(torch.zeros(2, d))
        with pytest.raises(ValueError):
            s.prefill(torch.zeros(2, d), dtype=torch.float64)
        s.prefill(torch.zeros(1, 2, d))  # a batch of one is fine
        with pytest.raises(StipServerError) as e:  # the server's own check, message passed through
            s.prefill(torch.zeros(2, d + 1))
        assert e.value.status == 422 and "hidden size" in str(e.value)
        assert s.decode(torch.zeros(1, d)).position == 3


def test_long_prompt_is_chunked_transparently(party):
    server, client, plain, conn = party
    limit = server.info()["max_message_bytes"]
    prompt = [(7 * i + 3) % client.vocab_size for i in range(40)]
    x = client.embed(torch.tensor(prompt))
    assert x.numel() * 4 > limit  # does not fit one message
    with conn.open_session() as s:
        r = s.prefill(x, positions="all", downlink=Downlink("logits"))
        assert r.position == 40 and r.logits.shape == (40, client.vocab_size)
        assert r.bytes_sent > x.numel() * 4
        ref = plain(input_ids=torch.tensor([prompt])).logits[0]
        assert torch.allclose(client.plain_logits(r.logits), ref, atol=1e-4)
        out = [int(client.plain_logits(r.logits[-1]).argmax())]
        for _ in range(5):
            r = s.decode(client.embed(torch.tensor([out[-1]]), start=s.position), downlink=Downlink("topk", 1))
            out.append(int(client.plain_ids(r.indices[0, 0])))
    assert out == plain_greedy(plain, prompt, 6)
    with conn.open_session() as s:  # last-position only, top-k
        r = s.prefill(x, downlink=Downlink("topk", 3))
        assert r.indices.shape == (1, 3) and r.position == 40


def test_detach_and_resume(party):
    _, client, _, conn = party
    s = conn.open_session()
    s.prefill(client.embed(torch.tensor([1, 2, 3])))
    s.detach()
    with conn.open_session(resume=s.id) as again:
        assert again.id == s.id and again.position == 3
        assert again.decode(client.embed(torch.tensor([4]), start=3)).position == 4
    with pytest.raises(StipServerError) as e:
        conn.open_session(resume=s.id)
    assert e.value.status == 404


def test_server_going_away_is_a_connection_error(tiny_protected):
    _, protected = tiny_protected("qwen2-bias-tied")
    with serve(protected, token=TOKEN, threads=1) as server:
        conn = Connection(server.url, token=TOKEN, timeout=10)
        s = conn.open_session()
        s.prefill(torch.randn(2, 48))
        server.proc.kill()
        server.proc.wait()
        with pytest.raises(StipConnectionError):
            s.decode(torch.randn(48))
        s.close()  # no raise on a dead connection
        with pytest.raises(StipConnectionError, match="cannot reach"):
            conn.open_session()
