"""Attacks on the client by the server it talks to (issue 18, items 9 and 12), each against real processes: the rogue
server (tests/rogue_server.py, a subprocess on loopback) serving a real `--noise` bundle's id, and `stip proxy`.

- Noise amplification: a server that forgets the session or drops the socket makes the client replay its context;
  with fresh noise per send, k copies of a row average to noise SIGMA / sqrt(k). The rogue records every row it
  receives; the copies must be identical, their average as noisy as one row, and the replays bounded.
- The same for `n` choices through the proxy: the prompt's rows are sent with the same noise, not n draws.
- One HTTP stack: a redirect to another host is not followed (HTTP or WebSocket), an oversized answer is refused.
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys

import httpx
import pytest
import torch

import stip
from stip.client.bundle import ClientBundle
from stip.client.http import HTTP_MAX_BYTES, HttpClient
from stip.client.sdk import Client
from stip.client.server_decode import MAX_LINE_BYTES
from stip.client.transport import (Connection, StipProtocolError, StipReplayLimitError, StipServerError)
from stip.server.launch import local_process
from tests.models import save_tiny
from tests.parties import stopped_in_background
from tests.rogue_server import BIG_BYTES

SIGMA = 0.05
PROMPT = [5, 17, 33, 8, 61, 12, 40, 3]
REPLAYS = 3  # the client's bound in these tests: the server gets the context 1 + REPLAYS times


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> ClientBundle:
    """A tiny LLaMA protected with --noise SIGMA (its client bundle, loaded)."""
    root = tmp_path_factory.mktemp("noisy")
    stip.protect(save_tiny("llama-gqa-untied", root / "plain"), root / "protected", noise=SIGMA, progress=False)
    return ClientBundle.load(root / "protected" / "client")


@pytest.fixture(scope="module")
def generated(noisy) -> int:
    """The token every rogue reply ranks first: any id that is not an EOS id (so generations run on)."""
    return next(t for t in range(noisy.vocab_size) if t not in noisy.eos_token_ids)


@pytest.fixture(scope="module")
def rogue(noisy, generated):
    """The rogue server's base URL, claiming to serve `noisy`; the first path segment picks its misbehaviour."""
    top = int(noisy.server_ids([generated])[0])
    proc = subprocess.Popen([sys.executable, "-m", "tests.rogue_server", "--bundle-id", noisy.bundle_id, "--signer",
                             noisy.signer, "--hidden", str(noisy.hidden_size), "--vocab", str(noisy.vocab_size),
                             "--top", str(top)], stdout=subprocess.PIPE, text=True)
    try:
        yield f"http://127.0.0.1:{int(proc.stdout.readline())}"
    finally:
        proc.kill()
        proc.wait(10)


def recorded(rogue: str, mode: str) -> list[dict]:
    """Every step frame the rogue received in `mode` since the last call: {"session", "op", "start", "rows"}."""
    return httpx.get(f"{rogue}/{mode}/recorded", timeout=10).json()


def copies_by_position(frames: list[dict]) -> dict[int, torch.Tensor]:
    """position -> every copy of that position's row the server received [copies, d]."""
    rows: dict[int, list] = {}
    for f in frames:
        for i, row in enumerate(f["rows"]):
            rows.setdefault(f["start"] + i, []).append(row)
    return {p: torch.tensor(r) for p, r in rows.items()}


def averaged_noise_std(copies: dict[int, torch.Tensor], clean: torch.Tensor) -> float:
    """The empirical std of (mean of a position's copies - its true row), over all positions and coordinates: SIGMA
    (times rms(E)) when the copies carry the same noise, that over sqrt(k) when k copies carry independent noise."""
    return float(torch.stack([c.mean(0) - clean[p] for p, c in copies.items()]).std())


@pytest.mark.parametrize("mode", ["expire", "drop"])
def test_forced_replays_resend_the_same_noise_and_are_bounded(noisy, generated, rogue, mode):
    """`expire`: the server forgets the session at every decode step (404); `drop`: it cuts the socket there. Both
    make the client replay its whole context, which the rogue collects, until the replay bound stops it."""
    client = Client(noisy, f"{rogue}/{mode}", timeout=10)
    client.max_replays = REPLAYS
    with pytest.raises(StipReplayLimitError, match=rf"lost this generation's session {REPLAYS + 1} times; not "
                                                   r"replaying its \d+ tokens of context again"):
        client.generate(ids=PROMPT, max_tokens=20, temperature=0)
    frames = recorded(rogue, mode)
    assert len({f["session"] for f in frames}) == 1 + REPLAYS  # the first send, then exactly REPLAYS replays
    copies = copies_by_position(frames)
    assert all(len(copies[p]) == 1 + REPLAYS for p in range(len(PROMPT)))
    context = PROMPT + [generated] * (len(copies) - len(PROMPT))
    clean = noisy.token_embedding[torch.tensor(context)]
    measured = averaged_noise_std(copies, clean)
    assert abs(measured - noisy.noise_std) < 0.15 * noisy.noise_std, (measured, noisy.noise_std)
    for p, c in copies.items():
        assert torch.equal(c, c[:1].expand_as(c)), f"position {p}: a replay sent fresh noise"


def test_the_measure_sees_averaging_of_independent_noise(noisy):
    """The control for the measure above: 1 + REPLAYS copies with independent noise (each from its own process's
    secret, as separate clients would draw) do average down, to about SIGMA / 2 here."""
    ids = torch.tensor(PROMPT * 4)
    k = 1 + REPLAYS
    draws = torch.stack([ClientBundle.load(noisy.path).embed(ids) for _ in range(k)])  # [k, T, d]
    copies = {p: draws[:, p] for p in range(len(ids))}
    measured = averaged_noise_std(copies, noisy.token_embedding[ids])
    expected = noisy.noise_std / k ** 0.5
    assert abs(measured - expected) < 0.15 * expected, (measured, expected)
    assert not torch.equal(draws[0], draws[1])  # different clients: independent noise


def test_noise_is_a_function_of_the_context(noisy):
    """Same context: the same rows, whether embedded at once or row by row; a context that differs at position i
    has independent noise from row i on, and the same rows before it."""
    ids = torch.tensor(PROMPT)
    whole = noisy.embed(ids)
    chain = noisy.noise_chain()
    steps = torch.cat([noisy.embed(ids[:3], noise=chain)] + [noisy.embed(ids[i:i + 1], start=i, noise=chain)
                                                             for i in range(3, len(PROMPT))])
    assert torch.equal(whole, steps)
    other = ids.clone()
    other[4] = (other[4] + 1) % noisy.vocab_size
    forked = noisy.embed(other)
    assert torch.equal(forked[:4], whole[:4])
    assert not torch.allclose(forked[5:], whole[5:])  # the same tokens after the fork, with other noise
    with pytest.raises(ValueError, match="noise_chain"):
        noisy.embed(ids[:1], start=3)  # a row in the middle of an unknown context: no noise to give it


def test_n_choices_share_the_prompts_noise(noisy, rogue):
    """`n` completions through `stip proxy`: the server gets the prompt n times, the same noisy rows each time."""
    recorded(rogue, "good")
    cmd = lambda port: [sys.executable, "-m", "stip.cli", "proxy", str(noisy.path), "--server", f"{rogue}/good",
                        "--port", str(port)]
    with stopped_in_background(local_process(cmd, ready_path="/v1/models")) as proxy:
        r = httpx.post(proxy.url + "/v1/completions", json={"model": "m", "prompt": PROMPT, "n": 3, "max_tokens": 2,
                                                           "temperature": 1.0}, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 3
    prompts = [torch.tensor(f["rows"]) for f in recorded(rogue, "good") if f["op"] == "prefill"]
    assert len(prompts) == 3 and prompts[0].shape[0] == len(PROMPT)
    assert all(torch.equal(p, prompts[0]) for p in prompts[1:]), "the n choices sent independent noise"


# ------------------------------------------------------------------ one HTTP stack: redirects, size caps


def test_a_redirect_to_another_host_is_not_followed(noisy, rogue):
    """Every HTTP request and the WebSocket handshake are answered with a redirect to 127.0.0.2, where a listening
    socket would see any connection the client made: none is, and the error names the redirect."""
    with socket.create_server(("127.0.0.2", 0)) as trap:
        url = f"{rogue}/redirect-{trap.getsockname()[1]}"
        with pytest.raises(StipServerError, match=r"redirected /v1/info \(302\) to 'http://127.0.0.2:.*not followed"):
            Connection(url, token="secret").info()
        with pytest.raises(StipServerError, match=r"redirected the session \(302\) to .*not followed"):
            Connection(url, token="secret").open_session()
        with pytest.raises(StipServerError, match="redirects are not followed"):
            Client(noisy, url, token="secret")
        assert select.select([trap], [], [], 0)[0] == [], "the client connected to the redirect's host"


@pytest.mark.parametrize("mode, words", [("big", rf"announced {BIG_BYTES} bytes, more than the {HTTP_MAX_BYTES}"),
                                         ("bigstream", rf"answered more than {HTTP_MAX_BYTES} bytes")])
def test_an_oversized_answer_is_refused(noisy, rogue, mode, words):
    with pytest.raises(StipProtocolError, match=words):
        Client(noisy, f"{rogue}/{mode}")


def test_a_streamed_line_is_capped_before_it_is_buffered(rogue):
    """Server-decode reads its answer line by line: a line that never ends is refused once it passes the cap."""
    http = HttpClient(f"{rogue}/bigstream")
    response = http.open_stream("GET", "/v1/info")
    try:
        with pytest.raises(StipProtocolError, match=rf"sent a line of more than {MAX_LINE_BYTES} bytes"):
            for _ in http.iter_lines(response, "/v1/info", MAX_LINE_BYTES):
                pass
    finally:
        response.close()
        http.close()
