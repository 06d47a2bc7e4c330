"""Issue 18, item 10: the TEE client follows `stip.Client`'s transport rules, and `stip proxy` in front of an enclave
passes them on and says why an attestation was refused.

Attacks, against real processes (a real `stip serve --tee-worker` and `stip enclave`, from tests/test_tee.py):
- a TEE client pointed at a plain http:// enclave off loopback would send its bearer token in clear text: refused
  before any connection (a real listener on this machine's non-loopback address sees nothing);
- an https:// enclave whose certificate does not verify against the pinned CA (or the system store) is refused;
  with `ca_file` the client talks to it (a TLS terminator in front of the enclave, as one would deploy it);
- `stip proxy` on a TEE bundle used to drop --ca-file and --insecure;
- a proxy without --allow-simulated in front of a simulated enclave answered a bare 500 and logged nothing: now a
  502 naming the failed check, in its log too.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import sys
import threading

import openai
import pytest

from stip.client.tee import TeeClient
from stip.client.transport import StipCertificateError
from stip.common.hosts import is_loopback_host
from stip.errors import StipError
from stip.server.launch import local_process
from tests.parties import stopped_in_background
from tests.test_tee import CLIENT_TOKEN, PROMPT, plain_greedy
from tests.test_tls import _Connects, pki  # noqa: F401 - pki is a fixture


def non_loopback_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one that is not loopback."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            address = s.getsockname()[0]
        with socket.socket() as s:
            s.bind((address, 0))
    except OSError:
        return None
    return None if is_loopback_host(address) or address == "0.0.0.0" else address


class Relay:
    """A real TCP listener on `host` (in a thread): counts connections and keeps each one's first bytes; forwards
    them to 127.0.0.1:`backend` when given (with `tls`, it terminates TLS first, like a proxy in front of the
    enclave), else closes them."""

    def __init__(self, host: str, backend: int | None = None, tls: ssl.SSLContext | None = None):
        self.first: list[bytes] = []
        self.backend, self.writers, self.loop = backend, set(), asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test relay")
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, host, 0, ssl=tls), self.loop).result(10)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://{host}:{port}"

    async def _handle(self, reader, writer):
        self.writers.add(writer)
        data = await reader.read(65536)
        self.first.append(data)
        if self.backend is None or not data:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.backend)
        self.writers.add(up_writer)
        up_writer.write(data)

        async def pipe(src, dst):
            with contextlib.suppress(OSError, ssl.SSLError):
                while chunk := await src.read(65536):
                    dst.write(chunk)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def _close(self):
        self.server.close()
        for writer in self.writers:
            writer.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self):
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def relay(host: str, backend: int | None = None, tls: ssl.SSLContext | None = None):
    r = Relay(host, backend, tls)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture(scope="module")
def tee(tee_stacks):
    """(TEE client bundle, enclave process, the plain model's 4 greedy tokens after PROMPT): test_tee's GPT-2 stack
    (tests/conftest.py), a real worker and enclave."""
    name, out, _, enclave = tee_stacks("gpt2")
    return out / "tee-client", enclave, plain_greedy(name, PROMPT, 4)[0]


@pytest.fixture(scope="module")
def https_enclave(tee, pki):  # noqa: F811
    """The enclave behind a TLS terminator whose certificate (127.0.0.1) the test CA signed."""
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(pki["cert"], pki["key"])
    with relay("127.0.0.1", tee[1].port, tls) as r:
        yield r.url


def _tee_client(bundle, url, **kw):
    return TeeClient(bundle, url, allow_simulated=True, token=kw.pop("token", CLIENT_TOKEN), **kw)


def test_token_never_goes_in_clear_text_to_an_enclave_off_loopback(tee):
    bundle, _, _ = tee
    address = non_loopback_address()
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(relay(address)) if address else None
        url = listener.url if listener else "http://192.0.2.1:9"  # no such address here: the audit hook suffices
        seen = _Connects.watch()
        for form in (url, url.replace("http://", "ws://")):
            with pytest.raises(StipError, match="refusing to send the token in clear text.*--insecure"):
                _tee_client(bundle, form).generate(ids=PROMPT, max_tokens=2)
        assert seen == []  # refused before any connection
        _tee_client(bundle, url, token=None)  # no token: nothing secret to protect
        if listener:
            assert listener.first == []
            # insecure=True allows exactly that: the token reaches the (fake) enclave unencrypted
            with pytest.raises(StipError, match="enclave"):
                _tee_client(bundle, url, insecure=True, timeout=10).generate(ids=PROMPT, max_tokens=2)
            assert f"Bearer {CLIENT_TOKEN}".encode() in listener.first[0]


def test_ca_file_pins_the_https_enclave(tee, https_enclave, pki):  # noqa: F811
    bundle, _, expected = tee
    g = _tee_client(bundle, https_enclave, ca_file=pki["ca"]).generate(ids=PROMPT, max_tokens=4)
    assert g.token_ids == expected
    with pytest.raises(StipCertificateError, match="system trust store"):
        _tee_client(bundle, https_enclave).generate(ids=PROMPT, max_tokens=2)
    with pytest.raises(StipCertificateError, match="pinned CA file"):
        _tee_client(bundle, https_enclave, ca_file=pki["other_ca"]).generate(ids=PROMPT, max_tokens=2)
    with pytest.raises(StipError, match="not https"):  # a CA file on a plain URL would verify nothing
        _tee_client(bundle, https_enclave.replace("https://", "http://"), ca_file=pki["ca"])


def _proxy(bundle, server_url: str, *args: str):
    return stopped_in_background(local_process(
        lambda port: [sys.executable, "-m", "stip.cli", "proxy", str(bundle), "--server", server_url, "--port",
                      str(port), *args], ready_path="/health", token=CLIENT_TOKEN))


def _complete(proxy, **kw):
    oai = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    return oai.completions.create(model="m", prompt=PROMPT, temperature=0, **kw)


def test_proxy_passes_insecure_through_to_the_tee_client(tee):
    """`stip proxy --insecure` reaches an enclave over plain http at this machine's non-loopback address (without
    it the TEE client refuses to start: test above), and its answers are the plain model's greedy tokens."""
    bundle, enclave, expected = tee
    address = non_loopback_address()
    with relay(address or "127.0.0.1", enclave.port) as forward, \
            _proxy(bundle, forward.url, "--allow-simulated", *(["--insecure"] if address else [])) as proxy:
        r = _complete(proxy, max_tokens=4, logprobs=1)
    assert [int(t.removeprefix("token_id:")) for t in r.choices[0].logprobs.tokens] == expected
    assert f"Bearer {CLIENT_TOKEN}".encode() in forward.first[0]  # the token went, unencrypted, as asked


def test_proxy_refuses_a_simulated_enclave_with_a_502_naming_the_check(tee, https_enclave, pki):  # noqa: F811
    """A proxy without --allow-simulated, in front of the https enclave with --ca-file (which it now passes on: the
    report arrives, so the certificate verified): the OpenAI client gets a 502 saying the report is SIMULATED,
    streaming or not, and the proxy's log says so (never the token)."""
    bundle, _, _ = tee
    with _proxy(bundle, https_enclave, "--ca-file", str(pki["ca"])) as proxy:
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as refused:
                _complete(proxy, max_tokens=2, stream=stream)
            assert refused.value.status_code == 502
            message = refused.value.message
            assert "attestation" in message and "SIMULATED" in message and "--allow-simulated" in message
            assert "certificate" not in message
        log = proxy.log()
    assert log.count("SIMULATED") >= 2 and "502" in log and CLIENT_TOKEN not in log
