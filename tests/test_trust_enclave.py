"""Who may use the enclave (issue 18, item 13), attacked against a real `stip enclave` and `stip serve --tee-worker`:
no tokenless bind off loopback, no attestation without the token, and per-client limits, so one client flooding
attestations or holding its quota of sessions leaves room for the others. Clients are told apart by their peer
address: each test's clients connect from their own loopback address (127.0.0.N), as clients on other hosts would."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from stip.client.tee import SimulatedVerifier, TeeBundle, verify_report
from stip.common.channel import NONCE_BYTES, Channel, new_keypair, public_bytes
from stip.common.tee_protocol import ATTEST_PATH, SESSION_PATH
from stip.enclave.admission import client_id
from stip.server.launch import local_process, server_env
from tests.models import save_tiny
from tests.parties import serve
from tests.test_tee import CLIENT_TOKEN, PROMPT, WORKER_TOKEN, enclave_command

MAX_SESSIONS, CLIENT_SESSIONS, CLIENT_PENDING = 3, 2, 4
B_TOKENS = 20


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(protected folder, worker, enclave): one tiny GPT-2 TEE stack with small limits, shared by the module."""
    import stip

    root = tmp_path_factory.mktemp("trust-enclave")
    stip.protect(save_tiny("gpt2", root / "plain"), root / "protected", progress=False, tee=True)
    out = root / "protected"
    limits = ["--max-sessions", str(MAX_SESSIONS), "--client-max-sessions", str(CLIENT_SESSIONS),
              "--client-max-pending", str(CLIENT_PENDING),
              "--max-batch", "2"]  # fewer step slots than sessions: fair turns decide who steps in each batch
    with serve(out, "--tee-worker", token=WORKER_TOKEN) as worker, \
            local_process(enclave_command(out / "enclave", worker.url, *limits), "/health",
                          env={"STIP_WORKER_TOKEN": WORKER_TOKEN, "STIP_TOKEN": CLIENT_TOKEN}) as enclave:
        yield out, worker, enclave


class Peer:
    """A TEE client connecting from its own loopback address; the protocol steps of `TeeClient`, one by one."""

    def __init__(self, stack, address: str, token: str | None = CLIENT_TOKEN):
        out, _, enclave = stack
        self.bundle, self.address, self.url = TeeBundle(out / "tee-client"), address, enclave.url
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(transport=httpx.HTTPTransport(local_address=address), trust_env=False, timeout=60)

    def attest(self) -> tuple[httpx.Response, bytes]:
        nonce = os.urandom(NONCE_BYTES)
        r = self.http.post(self.url + ATTEST_PATH, json={"nonce": base64.b64encode(nonce).decode()},
                           headers=self.headers)
        return r, nonce

    def connect(self):
        """The session socket, from this peer's address (raises InvalidStatus when refused)."""
        where = urlsplit(self.url)
        sock = socket.create_connection((where.hostname, where.port), timeout=60, source_address=(self.address, 0))
        return connect(self.url.replace("http://", "ws://") + SESSION_PATH, sock=sock, additional_headers=self.headers,
                       compression=None)

    def open(self, attested: tuple[httpx.Response, bytes] | None = None):
        """Attest (or take a report this peer already holds), verify, open the socket and the channel."""
        r, nonce = attested or self.attest()
        assert r.status_code == 200, r.text
        v = verify_report(r.json(), expected_measurement=self.bundle.measurement, nonce=nonce, allow_simulated=True,
                          verifiers={"stip-simulated-v1": SimulatedVerifier(self.bundle.tee["platform_key"])})
        key = new_keypair()
        channel = Channel.derive(key, v.public_key, client_public=public_bytes(key), enclave_public=v.public_key,
                                 nonce=nonce, measurement=v.measurement, role="client")
        deadline = time.monotonic() + 30
        while True:  # an earlier test's closed sessions may take a moment to give their slots back
            try:
                ws = self.connect()
                break
            except InvalidStatus as e:
                if e.response.status_code != 503 or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        ws.send(json.dumps({"client_public_key": base64.b64encode(public_bytes(key)).decode(),
                            "nonce": base64.b64encode(nonce).decode()}))
        return ws, channel

    @staticmethod
    def generate(ws, channel, max_tokens: int, on_chunk=lambda chunk: None) -> list[int]:
        ws.send(channel.seal_json({"op": "generate", "ids": PROMPT, "max_tokens": max_tokens}))
        ids = []
        while True:
            chunk = channel.open_json(ws.recv(timeout=60))
            assert "error" not in chunk, chunk
            ids += chunk["ids"]
            on_chunk(chunk)
            if chunk.get("finish_reason"):
                return ids


def test_tokenless_enclave_off_loopback_refuses_to_start(stack):
    """`stip enclave --host 0.0.0.0` without a client token exits with a CLI error before loading anything (as
    `stip serve` does); on loopback a tokenless enclave is allowed, with a warning."""
    out, worker, _ = stack
    for host in ("0.0.0.0", "::"):
        r = subprocess.run(enclave_command(out / "enclave", worker.url, "--host", host)(1), capture_output=True,
                           text=True, timeout=60, env=server_env(None, {"STIP_WORKER_TOKEN": WORKER_TOKEN}))
        assert r.returncode == 2, r.stderr
        assert f"refusing to listen on {host} without a client token" in r.stderr and "Traceback" not in r.stderr


def test_attest_and_session_need_the_token(stack):
    for token in (None, "wrong"):
        r, _ = Peer(stack, "127.0.0.2", token=token).attest()
        assert r.status_code == 401 and "client token" in r.json()["error"]
        with pytest.raises(InvalidStatus) as e:
            Peer(stack, "127.0.0.2", token=token).connect()
        assert e.value.response.status_code == 401


def test_attestation_flood_is_limited_per_client(stack):
    """A client that asks for reports without opening their sessions is held to its own limit of pending
    attestations (429, saying so); another client still attests and generates, and the flooder gets room back
    once it opens a session with one of its reports."""
    flooder = Peer(stack, "127.0.0.3")
    replies = [flooder.attest() for _ in range(CLIENT_PENDING + 3)]
    assert [r.status_code for r, _ in replies] == [200] * CLIENT_PENDING + [429] * 3
    assert f"holds {CLIENT_PENDING} attestations waiting for their session, its limit" in replies[-1][0].json()["error"]
    other = Peer(stack, "127.0.0.4")
    ws, channel = other.open()
    with ws:
        assert len(Peer.generate(ws, channel, 3)) == 3
    ws, channel = flooder.open(replies[0])  # a session on one of its pending reports frees one slot
    with ws:
        Peer.generate(ws, channel, 1)  # the enclave has taken the hello
    assert flooder.attest()[0].status_code == 200 and flooder.attest()[0].status_code == 429


def test_session_quota_keeps_room_for_other_clients(stack):
    """Client A holds its quota of sessions, both generating without pause: its next session is refused (429),
    client B still opens one and finishes its generation while A's keep running, taking turns with them
    (B's session gets as many steps as A's two together); the
    enclave being full (A's two and B's) refuses a third client with 503."""
    a, b, c = Peer(stack, "127.0.0.5"), Peer(stack, "127.0.0.6"), Peer(stack, "127.0.0.7")
    a_sessions = [a.open() for _ in range(CLIENT_SESSIONS)]
    with pytest.raises(InvalidStatus) as e:
        a.connect()
    assert e.value.response.status_code == 429 and b"close a session" in e.value.response.body
    b_done, lock, a_rounds = threading.Event(), threading.Lock(), {"chunks": 0, "generations": 0}

    def keep_busy(session):
        ws, channel = session
        while not b_done.is_set():
            Peer.generate(ws, channel, 40, on_chunk=lambda _: count("chunks"))
            count("generations")
            assert a_rounds["generations"] < 40, "client B never finished while A generated"

    def count(what):
        with lock:
            a_rounds[what] += 1

    with ThreadPoolExecutor(CLIENT_SESSIONS) as pool:
        busy = [pool.submit(keep_busy, s) for s in a_sessions]
        try:
            ws, channel = b.open()
            with ws:
                with pytest.raises(InvalidStatus) as e:
                    c.connect()
                assert e.value.response.status_code == 503 and b"enclave is full" in e.value.response.body
                before = a_rounds["chunks"]
                assert len(Peer.generate(ws, channel, B_TOKENS)) == B_TOKENS
                during = a_rounds["chunks"] - before
        finally:
            b_done.set()
            for f in busy:
                f.result()
    # one step per token; round-robin gave A's two sessions one step between two of B's (first come, first served
    # would give them two); the slack is chunks A's threads had not read yet when B started or finished
    assert during <= B_TOKENS + 8, f"client A got {during} steps while B generated {B_TOKENS} tokens"
    for ws, _ in a_sessions:
        ws.close()


def test_fair_pick_round_robin_over_clients():
    """The enclave's share of model steps (stip.enclave.batch.fair_pick): with more steps waiting than a batch holds,
    the least recently served client goes first, so a client with three steps waiting takes turns with the others
    instead of going first, in FIFO order within the client; a batch takes one step per client per round."""
    from types import SimpleNamespace

    from stip.enclave.batch import fair_pick

    def waiting():
        return [SimpleNamespace(client=c, label=label) for c, label in
                (("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("c", "c1"), ("b", "b2"))]

    pending, served, order = waiting(), {"a": 1}, ["a0"]  # a0 ran first, alone
    while pending:  # batches of one: the order steps run in
        step, = fair_pick(pending, served, 1)
        pending.remove(step)
        served[step.client] = len(order) + 1
        order.append(step.label)
    assert order == ["a0", "b1", "c1", "a1", "b2", "a2", "a3"]
    assert [s.label for s in fair_pick(waiting(), {"a": 1}, 3)] == ["b1", "c1", "a1"]
    assert [s.label for s in fair_pick(waiting(), {"a": 1}, 5)] == ["b1", "c1", "a1", "b2", "a2"]


def test_client_id_groups_ipv6_by_prefix():
    assert client_id("token", "192.0.2.7") == "token@192.0.2.7"
    assert client_id("token", "2001:db8::1") == client_id("token", "2001:db8::ffff") == "token@2001:db8::/64"
    assert client_id("token", "::ffff:192.0.2.7") == "token@192.0.2.7"
    assert client_id("anonymous", None) == "anonymous@unknown"
