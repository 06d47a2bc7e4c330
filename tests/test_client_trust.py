"""The client trusts nothing from the server: a real misbehaving server (tests/rogue_server.py, a subprocess on
loopback) breaks the protocol one way per URL, and every break is a StipProtocolError naming it, never a result."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from stip.client.transport import (HELLO_MAX_BYTES, Connection, Downlink, StipProtocolError, StipServerError,
                                   _server_error)
from stip.common import wire
from tests.rogue_server import HIDDEN, VOCAB


@pytest.fixture(scope="module")
def rogue():
    """The rogue server's base URL; the first path segment picks its misbehaviour."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.rogue_server"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(10)


def session(rogue, mode):
    return Connection(f"{rogue}/{mode}", timeout=10).open_session()


def test_a_well_behaved_server_is_accepted(rogue):
    with session(rogue, "good") as s:
        assert s.info["protocol"] == wire.PROTOCOL_VERSION and s.position == 0
        r = s.prefill(torch.randn(3, HIDDEN), downlink=Downlink("topk", 5))
        assert r.position == 3 and r.indices.tolist() == [[0, 1, 2, 3, 4]]
        assert r.logsumexp.shape == (1,) and r.logsumexp[0] >= r.values[0, 0]
        r = s.prefill(torch.randn(2, HIDDEN), positions="all", downlink=Downlink("topk", 100))  # k capped at V
        assert r.position == 5 and r.indices.shape == (2, VOCAB) and r.logsumexp.shape == (2,)
        r = s.decode(torch.randn(HIDDEN), downlink=Downlink("logits"))
        assert r.position == 6 and r.logits.shape == (1, VOCAB) and r.logsumexp is None


@pytest.mark.parametrize("mode, words", [
    ("protocol", "protocol version"),
    ("nohello", "no STIP hello"),
    ("bighello", "larger than"),
    ("texthello", "text frame"),
])
def test_bad_hello_is_refused(rogue, mode, words):
    with pytest.raises(StipProtocolError, match=words):
        session(rogue, mode)


@pytest.mark.parametrize("mode, words", [
    ("index", r"index out of range \[0, 50\)"),
    ("repeat", "repeat"),
    ("shape", r"shape \[1, 6\], expected \[1, 5\]"),
    ("dtype", "dtype 'float16'"),
    ("kind", "kind 'logits'"),
    ("position", "position 10, expected 3"),
    ("nan", "NaN"),
    ("order", "descending"),
    ("short", r"payload of 40 bytes, but shape \[1, 5\] topk needs 44"),
    ("oversized", "larger than"),
    ("badstatus", "malformed reply header"),
])
def test_bad_reply_is_refused_and_the_session_dropped(rogue, mode, words):
    s = session(rogue, mode)
    # refused by the reply's own check, not after a timeout: a read timeout is a StipConnectionError, not this
    with pytest.raises(StipProtocolError, match=words):
        s.prefill(torch.randn(3, HIDDEN), downlink=Downlink("topk", 5))
    assert not s.connected and s.position == 0  # never continued after a reply it could not trust


def test_wrong_logits_shape_is_refused(rogue):
    with session(rogue, "shape") as s, pytest.raises(StipProtocolError, match=rf"expected \[1, {VOCAB}\]"):
        s.decode(torch.randn(HIDDEN), downlink=Downlink("logits"))


def test_frame_caps_follow_the_request():
    assert HELLO_MAX_BYTES == 4 + wire.MAX_HEADER_BYTES
    assert isinstance(_server_error({"ok": False, "status": 404, "error": "gone"}), StipServerError)
    assert isinstance(_server_error({"ok": False, "status": True, "error": "x"}), StipProtocolError)
    assert isinstance(_server_error({"ok": "yes"}), StipProtocolError)
