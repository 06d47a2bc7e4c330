"""TEE mode, the data owner's side: verify the enclave's attestation, open the encrypted channel, generate.

The client holds nothing secret about the model: a tee-client bundle has the tokenizer, the model's config, the
enclave's expected measurement and (simulated mode) the platform key it pins. Before anything is sent it asks the
enclave for a report over a fresh nonce and checks it with `stip.client.attestation.verify_report`: the verifier of
the report's format (a simulated report, refused unless `allow_simulated`, or a real format registered there: the
Nitro verifier), then the pinned measurement, the nonce just sent, and `max_age`. Any failure is a `TeeError` naming
the check.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from stip.client.attestation import (SIMULATED_FORMAT, VERIFIERS, EvidenceVerifier,  # noqa: F401 - re-exported
                                     SimulatedVerifier, Verified, register_verifier, verify_report)
from stip.errors import TeeError

__all__ = ["TeeError", "Verified", "EvidenceVerifier", "SimulatedVerifier", "verify_report", "register_verifier"]


# ---------------------------------------------------------------------------------------------- the TEE client

TEE_CLIENT_ROLE = "tee-client"


def is_tee_bundle(path) -> bool:
    """A key-less TEE client bundle (`stip protect --tee` writes DIR/tee-client/)?"""
    from pathlib import Path

    try:
        return json.loads((Path(path) / "stip-manifest.json").read_text()).get("role") == TEE_CLIENT_ROLE
    except (OSError, ValueError, AttributeError):
        return False


class TeeBundle:
    """The data owner's TEE bundle: tokenizer, config, the enclave's expected measurement; nothing secret."""

    def __init__(self, path, trusted=None):
        from pathlib import Path

        from stip.common.bundles.manifest import read_manifest

        self.path = Path(path)
        self.manifest = read_manifest(self.path, role=TEE_CLIENT_ROLE, trusted=trusted)
        self.config = json.loads((self.path / "stip_client.json").read_text())
        tee = self.config.get("tee")
        if not isinstance(tee, dict) or not isinstance(tee.get("measurement"), str):
            raise TeeError(f"{self.path}: stip_client.json pins no enclave measurement")
        self.tee = tee
        self._tokenizer = None

    bundle_id = property(lambda self: self.manifest["bundle_id"])
    signer = property(lambda self: self.manifest["signer"]["fingerprint"])
    mode = property(lambda self: "tee")
    task = property(lambda self: self.config.get("task", "text-generation"))
    vocab_size = property(lambda self: int(self.config["vocab_size"]))
    eos_token_ids = property(lambda self: list(self.config.get("eos_token_ids") or []))
    measurement = property(lambda self: self.tee["measurement"])
    has_tokenizer = property(lambda self: "tokenizer_config.json" in self.manifest["files"])

    @property
    def tokenizer(self):
        """tokenizers and jinja2 (`stip.client.tokenizer`: no transformers), from the signed files only."""
        from stip.client.tokenizer import LightTokenizer
        from stip.errors import BundleError

        if not self.has_tokenizer:
            raise BundleError(f"TEE client bundle {self.path} has no tokenizer; pass token ids instead of text")
        if self._tokenizer is None:
            self._tokenizer = LightTokenizer.load(self.path, lambda name: name in self.manifest["files"])
        return self._tokenizer

    def plain_ids(self, ids):  # TEE replies carry plain ids already (for code shared with the other clients)
        import numpy as np

        return np.asarray(ids, dtype=np.int64)


class TeeClient:
    """`stip.Client`'s generate/stream/encode against an enclave: every generation attests the enclave afresh (new
    nonce), verifies the report, opens a new channel and streams tokens over it."""

    def __init__(self, bundle, enclave_url: str | None = None, *, allow_simulated: bool = False,
                 timeout: float = 60.0, trusted=None, measurement: str | None = None,
                 verifiers: dict[str, EvidenceVerifier] | None = None, token: str | None = None,
                 ca_file: str | Path | None = None, insecure: bool = False):
        """`token` (default $STIP_TOKEN), `ca_file` and `insecure` as for `stip.Client`: https is verified against
        the system store or only `ca_file`, and the token never goes in clear text off loopback unless `insecure`."""
        from stip.client.transport import Connection

        self.bundle = bundle if isinstance(bundle, TeeBundle) else TeeBundle(bundle, trusted=trusted)
        url = enclave_url or self.bundle.tee.get("enclave_url")
        if not url:
            raise TeeError(f"no enclave URL: pass one (the bundle {self.bundle.path} leaves it to the user)")
        rules = Connection(url, token=token, timeout=timeout, ca_file=ca_file, insecure=insecure)  # decides, here
        rules.close()  # (its HTTP client is never used: attest() has its own, for the enclave)
        self.url, self.ssl, self.ca_file = rules.url, rules.ssl, ca_file
        self.allow_simulated, self.timeout = allow_simulated, timeout
        self.headers = {"Authorization": f"Bearer {rules.token}"} if rules.token else {}  # the enclave's client token
        self.expected_measurement = measurement or self.bundle.measurement
        self.verifiers = dict(verifiers or {})
        pin = self.bundle.tee.get("platform_key")
        if pin and SIMULATED_FORMAT not in self.verifiers:
            self.verifiers[SIMULATED_FORMAT] = SimulatedVerifier(pin)
        try:  # registers the real formats' verifiers (stip.client.nitro needs cbor2 and pycose)
            import stip.client.nitro  # noqa: F401
        except ImportError:
            pass
        for fmt, factory in VERIFIERS.items():
            self.verifiers.setdefault(fmt, factory(self.bundle.config))
        self.max_positions = int(self.bundle.config.get("max_positions") or 0)
        self.last_verified: Verified | None = None
        from stip.client.transport import Downlink

        self.downlink = Downlink(kind="logits")  # the enclave samples from all logits (for the proxy's checks)

    @property
    def tokenizer(self):
        return self.bundle.tokenizer

    @property
    def task(self) -> str:
        return self.bundle.task

    def encode(self, prompt=None, messages=None, ids=None) -> list[int]:
        from stip.client.sdk import Client

        return Client.encode(self, prompt, messages, ids)

    def generate(self, prompt=None, messages=None, ids=None, **sampling):
        stream = self.stream(prompt=prompt, messages=messages, ids=ids, **sampling)
        for _ in stream:
            pass
        return stream.generation

    def stream(self, prompt=None, messages=None, ids=None, params=None, **sampling):
        from stip.client.types import GenerationStream
        from stip.common.sampling import SamplingParams

        params = params or SamplingParams(**sampling)
        if params.logit_bias or params.grammar:
            raise ValueError("logit_bias and structured output are not supported in TEE mode")
        return GenerationStream(self._run(self.encode(prompt, messages, ids), params))

    # ------------------------------------------------------------------ attest, open, stream

    def attest(self) -> tuple[Verified, bytes]:
        """POST a fresh nonce to the enclave and verify its report; (what was verified, the nonce)."""
        import os

        from stip.client.http import HttpClient
        from stip.common.channel import NONCE_BYTES
        from stip.common.tee_protocol import ATTEST_PATH

        nonce = os.urandom(NONCE_BYTES)
        http = HttpClient(self.url, timeout=self.timeout, ssl=self.ssl, ca_file=self.ca_file, peer="the enclave",
                          hint=" (is `stip enclave` running?)")
        try:  # the client's one HTTP stack: TLS, no redirects, the answer's size capped
            r = http.fetch("POST", ATTEST_PATH, json_body={"nonce": base64.b64encode(nonce).decode()},
                           headers=self.headers)
        finally:
            http.close()
        if r.status != 200:
            raise TeeError(f"the enclave refused to attest ({r.status}): {r.body[:200].decode(errors='replace')}")
        try:
            report = json.loads(r.body)
        except ValueError:
            raise TeeError("the enclave's attestation reply is not JSON") from None
        v = verify_report(report, expected_measurement=self.expected_measurement, nonce=nonce,
                          verifiers=self.verifiers, allow_simulated=self.allow_simulated)
        self.last_verified = v
        return v, nonce

    def open(self):
        """Attest, then open the session socket and the channel: (websocket, channel)."""
        from stip.client.http import ws_url as session_url
        from stip.client.session import ws_connect
        from stip.common.channel import Channel, new_keypair, public_bytes
        from stip.common.tee_protocol import SESSION_PATH
        from stip.client.transport import StipConnectionError

        v, nonce = self.attest()
        key = new_keypair()
        channel = Channel.derive(key, v.public_key, client_public=public_bytes(key), enclave_public=v.public_key,
                                 nonce=nonce, measurement=v.measurement, role="client")
        ws_url = session_url(self.url, SESSION_PATH)
        tls = {"ssl": self.ssl} if self.ssl is not None else {}
        try:
            ws = ws_connect(ws_url, open_timeout=self.timeout, max_size=64 * 1024 * 1024, compression=None,
                            additional_headers=self.headers, **tls)
        except Exception as e:  # noqa: BLE001 - name the enclave and the cause
            raise StipConnectionError(f"cannot open the enclave session at {ws_url}: {e}") from None
        ws.send(json.dumps({"client_public_key": base64.b64encode(public_bytes(key)).decode(),
                            "nonce": base64.b64encode(nonce).decode()}))
        return ws, channel

    def _recv(self, ws, channel):
        from websockets.exceptions import ConnectionClosed

        from stip.client.transport import StipConnectionError, StipProtocolError

        try:
            msg = ws.recv(timeout=self.timeout)
        except ConnectionClosed as e:
            rcvd = e.rcvd
            if rcvd is not None and rcvd.code == 1008:
                raise TeeError(f"the enclave closed the session: {rcvd.reason}") from None
            raise StipConnectionError(f"lost the enclave session: {e}") from None
        except TimeoutError:
            raise StipConnectionError(f"the enclave sent nothing for {self.timeout:.0f} s") from None
        if not isinstance(msg, bytes):
            raise StipProtocolError("the enclave sent a text frame inside the channel")
        return channel.open_json(msg)

    def _run(self, prompt_ids: list[int], params):
        import time as _time

        from pydantic import ValidationError

        from stip.client.types import Generation, Timing
        from stip.client.token_stream import TokenStream
        from stip.client.transport import StipProtocolError, StipServerError
        from stip.common.generate import GenerateChunk
        from stip.common.tee_protocol import TeeGenerateRequest
        from stip.errors import StipError

        bundle, tm, t_start = self.bundle, Timing(), _time.perf_counter()
        if self.max_positions and len(prompt_ids) >= self.max_positions:
            raise StipError(f"the prompt has {len(prompt_ids)} tokens; this model takes at most {self.max_positions}")
        request = TeeGenerateRequest(
            ids=prompt_ids, max_tokens=params.max_tokens,
            stop_ids=[e for e in bundle.eos_token_ids if 0 <= e < bundle.vocab_size],
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, seed=params.seed,
            logprobs=0 if params.logprobs is None else max(1, params.logprobs))
        ts = TokenStream(self.tokenizer if bundle.has_tokenizer else None, prompt_ids, bundle.eos_token_ids,
                         params.stop, params.logprobs)
        timing = {}
        ws, channel = self.open()
        try:
            ws.send(channel.seal_json(request.model_dump()))
            while ts.finish is None:
                obj = self._recv(ws, channel)
                c0 = _time.perf_counter()
                if not tm.prefill_ms:
                    tm.prefill_ms = (c0 - t_start) * 1e3
                if isinstance(obj, dict) and "error" in obj:
                    raise StipServerError(f"enclave error: {obj['error']}", int(obj.get("status") or 500))
                timing = obj.pop("timing", timing) if isinstance(obj, dict) else timing
                try:
                    chunk = GenerateChunk.model_validate(obj)
                except ValidationError as e:
                    raise StipProtocolError(f"the enclave sent a malformed chunk: {e.errors()[0].get('msg')}") \
                        from None
                if any(not 0 <= i < bundle.vocab_size for i in chunk.ids):
                    raise StipProtocolError(f"the enclave sent a token id outside [0, {bundle.vocab_size})")
                entries = None
                if ts.logprobs is not None and chunk.logprobs:
                    if len(chunk.logprobs) < len(chunk.ids):
                        raise StipProtocolError("the enclave sent fewer logprobs than tokens")
                    entries = [(lp.logprob, zip(lp.top_ids, lp.top_logprobs)) for lp in chunk.logprobs]
                delta = ts.push(list(chunk.ids), entries, chunk.finish_reason)
                tm.client_ms += (_time.perf_counter() - c0) * 1e3
                if delta:
                    yield delta
        finally:
            ws.close()  # ends the generation in the enclave if it was still running (a stop string matched)
        tm.total_ms = (_time.perf_counter() - t_start) * 1e3
        out = ts.out
        tm.steps = max(0, len(out) - 1)
        tm.server_ms = float(timing.get("enclave_ms", 0.0)) + float(timing.get("worker_ms", 0.0))
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(out),
                 "total_tokens": len(prompt_ids) + len(out)}
        glimpse = {"tee": {"measurement": self.last_verified.measurement, "format": self.last_verified.format,
                           "simulated": self.last_verified.simulated, **timing}}
        return Generation(ts.stops.text if ts.detok is not None else "", out, ts.finish, usage, tm, prompt_ids,
                          glimpse, ts.logprobs)
