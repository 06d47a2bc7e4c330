"""Faults: the real `stip serve` process is SIGKILLed mid-generation. Restarted on the same port with the same
bundle, the client replays its context on a fresh session and the tokens equal plain greedy generation exactly;
not restarted, the client raises a clear StipConnectionError within its reconnect bound. Never a wrong token."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM

from stip.client.sdk import Client
from stip.client.transport import StipConnectionError
from stip.reference import plain_greedy
from stip.server.launch import free_port, serve_command, server_env, stop
from tests.parties import isolated_server_bundle

TOKEN = "fault-token"
PROMPT = [5, 17, 3, 88, 42, 9, 61, 23]
N = 40
KILL_AT = 10  # decode steps before the kill


class Server:
    """`stip serve` on a fixed loopback port, so a restart comes back at the same URL."""

    def __init__(self, bundle, port: int):
        self.bundle, self.port, self.proc = bundle, port, None
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix="stip-fault-", suffix=".log", delete=False)

    def start(self, timeout: float = 120.0) -> "Server":
        self.proc = subprocess.Popen(serve_command(self.bundle, "--threads", "1", port=self.port), stdout=self.log,
                                     stderr=subprocess.STDOUT, env=server_env(TOKEN))
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, open(self.log.name).read()[-3000:]
            try:
                urllib.request.urlopen(self.url + "/health", timeout=5).close()
                return self
            except OSError:
                assert time.monotonic() < deadline, "stip serve did not start"
                time.sleep(0.1)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc)
        self.log.close()
        os.unlink(self.log.name)


@pytest.fixture()
def party(tiny_protected):
    plain_dir, protected = tiny_protected("gpt2")
    plain = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32).eval()
    servers: list[Server] = []
    with isolated_server_bundle(protected) as only_server:
        port = free_port()

        def launch() -> Server:
            servers.append(Server(only_server, port))
            return servers[-1].start()

        try:
            yield launch, protected, plain
        finally:
            for s in servers:
                s.close()


def kill_at_step(client: Client, step: int, fault) -> list:
    """Run `fault()` just before the client's `step`-th decode round trip (its frame then meets a dead server).
    The sessions, sockets and server are real; this only chooses the moment."""
    steps: list = []
    open_session = client.connection.open_session

    def opened(*args, **kw):
        session = open_session(*args, **kw)
        decode = session.decode

        def counted(*a, **k):
            steps.append(session.id)
            if len(steps) == step:
                fault()
            return decode(*a, **k)

        session.decode = counted
        return session

    client.connection.open_session = opened
    return steps


@pytest.mark.parametrize("downlink", ["topk", "logits"])
def test_killed_and_restarted_server_replays_to_the_exact_tokens(party, downlink):
    launch, protected, plain = party
    first = launch()
    client = Client(protected / "client", first.url, token=TOKEN, downlink=downlink, k=8)
    client.reconnect_timeout = 120.0  # a loaded 2-core CI machine restarts `stip serve` slowly
    restarted = threading.Event()

    def crash_and_restart():
        first.kill()
        threading.Thread(target=lambda: (launch(), restarted.set()), daemon=True).start()

    steps = kill_at_step(client, KILL_AT, crash_and_restart)
    g = client.generate(ids=PROMPT, max_tokens=N)
    assert restarted.wait(60) and len(steps) >= N - 1
    assert len(set(steps)) == 2  # the decode steps ran on two sessions: before and after the crash
    assert g.finish_reason == "length"
    assert g.token_ids == plain_greedy(plain, PROMPT, N)  # never a wrong token


def test_killed_server_that_stays_down_is_a_clear_error(party):
    launch, protected, _ = party
    server = launch()
    client = Client(protected / "client", server.url, token=TOKEN)
    client.reconnect_timeout = 3.0
    kill_at_step(client, KILL_AT, server.kill)
    outcome: list = []

    def generate():
        try:
            outcome.append(client.generate(ids=PROMPT, max_tokens=N))
        except Exception as e:
            outcome.append(e)

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    worker.join(120)  # a hang guard only: the event is the client giving up, and its error names the bound it kept
    assert outcome, "the client was still trying to resume after 120 s"
    assert isinstance(outcome[0], StipConnectionError), outcome
    assert re.search(r"lost the connection to .* could not resume within 3 s", str(outcome[0])), outcome
    with pytest.raises(StipConnectionError, match="cannot reach"):
        client.generate(ids=PROMPT, max_tokens=N)  # a new generation fails at once, clearly
