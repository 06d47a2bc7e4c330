"""`stip enclave DIR/enclave --worker URL`: the enclave as its own process, reachable only through messages.

`Enclave` is the interface a TEE backend implements: `attest(nonce)` (evidence binding the measurement, a fresh
X25519 channel key and the client's nonce), `open_channel(client_key, nonce)` and `generate(request)`. The backend
here, `SimulatedEnclave`, is an ordinary process on this machine (its own address space; the platform is a key file;
docs/tee.md says what that does not protect). It unseals its bundle with the platform's sealing secret, runs the
enclave's part of the model (stip.enclave.compute) and drives the GPU worker over the worker's WebSocket. Clients
reach it over HTTP (`POST /v1/attest`) and a WebSocket (`/v1/tee/session`, stip.enclave.session) carrying
channel-sealed JSON (stip.common.tee_protocol). Nothing secret is logged: not tokens, not ids, not keys.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse

from stip.common.channel import NONCE_BYTES, Channel, new_keypair, public_bytes
from stip.common.bundles.manifest import read_manifest
from stip.common.layout import MODEL_CONFIG_FILE
from stip.common.sampling import Sampler, SamplingParams
from stip.common.tee.layout import ENCLAVE_CONFIG_FILE, SEALED_FILE
from stip.common.tee.measurement import code_measurement, measurement
from stip.common.tee.platform import SimulatedPlatform, unb64
from stip.common.tee.sealing import read_header, sealing_key, unseal_tensors
from stip.common.tee_protocol import ATTEST_PATH, SESSION_PATH, TeeGenerateRequest
from stip.enclave.admission import Counter, Limits, Refused, check_bind, client_id
from stip.enclave.batch import MAX_BATCH, StepBatcher
from stip.enclave.session import HELLO_TIMEOUT_S, IDLE_TIMEOUT_S, serve_session  # noqa: F401 - re-exported
from stip.errors import StipError, TeeError

log = logging.getLogger("stip.enclave")

PENDING_TTL_S = 60.0  # a report's channel key waits this long for its session
RETRY_AFTER_S = 5


class Enclave:
    """What a TEE backend provides. Everything crosses its boundary as messages (reports, sealed frames)."""

    measurement: str

    def attest(self, nonce: bytes, client: str = "anonymous") -> dict:
        """Evidence {format, evidence} binding `measurement`, a fresh channel public key and `nonce`; `client`
        (stip.enclave.admission.client_id) is held to its limit of attestations waiting for their session."""
        raise NotImplementedError

    def open_channel(self, client_public: bytes, nonce: bytes) -> Channel:
        """The channel to the client that verified the report for `nonce` (each nonce opens one channel)."""
        raise NotImplementedError

    def generate(self, request: TeeGenerateRequest, client: str = "anonymous") -> Iterator[dict]:
        """GenerateChunk dicts, one per token, the last with finish_reason; `client` (stip.enclave.admission.client_id)
        is what the fair share of model steps counts in."""
        raise NotImplementedError


class SimulatedEnclave(Enclave):
    """The enclave in an ordinary local process, with a simulated platform (stip.common.tee.platform)."""

    def __init__(self, bundle: str | Path, platform: SimulatedPlatform, link, trusted=None,
                 limits: Limits = Limits(), pad_pool_bytes: int | None = None, max_batch: int = MAX_BATCH):
        from stip.enclave.compute import EnclaveModel

        bundle = Path(bundle)
        self.manifest = read_manifest(bundle, role="enclave", trusted=trusted)
        self.platform = platform
        self.measurement = measurement(bundle)
        code = code_measurement()
        header = read_header(bundle / SEALED_FILE)
        if header.get("code_measurement") != code:
            raise TeeError(f"{bundle} was sealed for enclave code {str(header.get('code_measurement'))[:16]}..., "
                           f"this enclave's code is {code[:16]}...: protect the model again with this STIP version")
        _, tensors = unseal_tensors(bundle / SEALED_FILE, sealing_key(platform.sealing_secret, code))
        self.config = json.loads((bundle / ENCLAVE_CONFIG_FILE).read_text())
        model_config = json.loads((bundle / MODEL_CONFIG_FILE).read_text())
        pool = {} if pad_pool_bytes is None else {"pool_bytes": pad_pool_bytes}
        self.model = EnclaveModel.from_tensors(model_config, tensors, link, **pool)
        if hasattr(link, "expect_bundle"):  # the worker must hold this run's secret bases
            link.expect_bundle(self.manifest["bundle_id"], self.model.lm_head_local)
        self.vocab_size = int(self.model.vocab_size)
        self.max_positions = int(self.config.get("max_positions") or 0)
        self._pending: dict[bytes, tuple[object, float, str]] = {}  # nonce -> (channel key, time, client)
        self._pending_count = Counter("attestations waiting for their session", limits.max_pending,
                                      limits.client_max_pending, f"open their sessions or wait {PENDING_TTL_S:.0f} s")
        self._lock = threading.Lock()
        self.batcher = StepBatcher(self.model, max_batch)  # concurrent sessions' steps, batched

    def attest(self, nonce: bytes, client: str = "anonymous") -> dict:
        if len(nonce) != NONCE_BYTES:
            raise TeeError(f"the nonce must be {NONCE_BYTES} random bytes")
        key = new_keypair()
        now = time.monotonic()
        with self._lock:
            for old in [n for n, v in self._pending.items() if now - v[1] >= PENDING_TTL_S]:
                self._pending_count.give_back(self._pending.pop(old)[2])
            if nonce in self._pending:
                raise TeeError("this nonce was already used; draw a fresh one for each attestation")
            self._pending_count.take(client)  # Refused (429 or 503) past a limit
            self._pending[nonce] = (key, now, client)
        return {**self.platform.report(self.measurement, public_bytes(key), nonce), "measurement": self.measurement}

    def open_channel(self, client_public: bytes, nonce: bytes) -> Channel:
        with self._lock:
            entry = self._pending.pop(nonce, None)
            if entry is not None:
                self._pending_count.give_back(entry[2])
        if entry is None or time.monotonic() - entry[1] >= PENDING_TTL_S:
            raise TeeError("no attestation is waiting for this nonce (unknown, already used or expired): call "
                           f"{ATTEST_PATH} first")
        key = entry[0]
        return Channel.derive(key, client_public, client_public=client_public, enclave_public=public_bytes(key),
                              nonce=nonce, measurement=self.measurement, role="enclave")


    def generate(self, request: TeeGenerateRequest, client: str = "anonymous") -> Iterator[dict]:
        ids = list(request.ids)
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        room = request.max_tokens
        if self.max_positions:
            if len(ids) >= self.max_positions:
                raise ValueError(f"the prompt has {len(ids)} tokens; the model takes at most {self.max_positions}")
            room = min(room, self.max_positions - len(ids))
        params = SamplingParams(max_tokens=room, temperature=request.temperature, top_k=request.top_k,
                                top_p=request.top_p, repetition_penalty=request.repetition_penalty,
                                presence_penalty=request.presence_penalty,
                                frequency_penalty=request.frequency_penalty, seed=request.seed)
        sampler, stops = Sampler(params, history=ids), set(request.stop_ids)
        m = self.model
        session = m.new_session()
        n, finish = 0, "length"
        self.batcher.open()
        try:
            logits = self.batcher.step(session, ids, client)
            while True:
                token = sampler.from_logits(logits)
                sampler.observe(token)
                n += 1
                chunk = {"ids": [token]}
                if request.logprobs:
                    lp = torch.log_softmax(logits.float(), -1)
                    v, k = torch.topk(lp, min(request.logprobs, lp.numel()))
                    chunk["logprobs"] = [{"logprob": float(lp[token]), "top_ids": k.tolist(),
                                          "top_logprobs": v.tolist()}]
                if token in stops or n >= room:
                    finish = "stop" if token in stops else "length"
                    break
                yield chunk
                logits = self.batcher.step(session, [token], client)
            t = session.timings
            yield {**chunk, "finish_reason": finish, "prompt_tokens": len(ids), "completion_tokens": n,
                   "timing": {"enclave_ms": 1e3 * t["enclave_s"], "worker_ms": 1e3 * t["worker_s"],
                              "pad_hits": t["pad_hits"], "pad_misses": t["pad_misses"]}}
        finally:
            self.batcher.close()
            try:
                m.close(session)
            except Exception:  # noqa: BLE001 - the worker may be gone; its session expires there
                log.warning("could not close a session at the worker")


def authorized(header: str | None, token: str | None) -> bool:
    """The client's bearer token, if the enclave was given one (`stip enclave --token` / STIP_TOKEN)."""
    if not token:
        return True
    scheme, _, value = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def create_app(enclave: Enclave, token: str | None = None, limits: Limits = Limits(), max_batch: int = MAX_BATCH):
    """`token`: clients must send it (Authorization: Bearer) to attest and to open a session; None: any client that
    reaches the enclave may (loopback only: `run_enclave` refuses other binds). `limits`: sessions in all and per
    client (stip.enclave.admission); the backend holds the attestation limits and batches the sessions' model steps,
    `max_batch` at a time, one per client per round while more wait (stip.enclave.batch)."""
    app = FastAPI(title="STIP enclave", docs_url=None, redoc_url=None, openapi_url=None)
    # a generation's thread waits in the batcher during its steps: one per open session, and room to close
    pool = ThreadPoolExecutor(max_workers=limits.max_sessions + 4, thread_name_prefix="stip-enclave")
    denied = {"error": "missing or wrong client token (Authorization: Bearer; STIP_TOKEN)"}
    principal = "token" if token else "anonymous"
    sessions = Counter("open sessions", limits.max_sessions, limits.client_max_sessions,
                       "close a session before opening another")

    def busy(e: Refused) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=e.status,
                            headers={"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None)

    @app.get("/health")
    async def health():
        pads = getattr(getattr(enclave, "model", None), "pads", None)  # counts only: rows from the pools, rows inline
        batcher = getattr(enclave, "batcher", None)  # batched steps: how many, how many sessions in them
        return {"status": "ok", "role": "enclave", "measurement": enclave.measurement,
                **({"pads": pads.stats()} if pads is not None else {}),
                **({"batching": batcher.stats()} if batcher is not None else {})}

    @app.post(ATTEST_PATH)
    async def attest(request: Request):
        if not authorized(request.headers.get("authorization"), token):
            return JSONResponse(denied, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        try:
            body = await request.json()
            nonce = unb64(body.get("nonce") if isinstance(body, dict) else None, "nonce", NONCE_BYTES)
            return enclave.attest(nonce, client=client_id(principal, request.client and request.client.host))
        except Refused as e:
            return busy(e)
        except (TeeError, ValueError) as e:
            return JSONResponse({"error": f"attest: {e}"}, status_code=400)

    @app.websocket(SESSION_PATH)
    async def session(ws: WebSocket):
        if not authorized(ws.headers.get("authorization"), token):
            await ws.send_denial_response(JSONResponse(denied, status_code=401, headers={"WWW-Authenticate": "Bearer"}))
            return
        client = client_id(principal, ws.client and ws.client.host)
        try:
            sessions.take(client)
        except Refused as e:
            await ws.send_denial_response(busy(e))
            return
        try:
            await serve_session(ws, enclave, step, client)
        finally:
            sessions.give_back(client)

    async def step(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    return app


def run_enclave(bundle: str | Path, worker: str, host: str = "127.0.0.1", port: int = 8100,
                platform_key: str | Path | None = None, worker_token: str | None = None, trusted=None,
                log_level: str = "info", token: str | None = None, limits: Limits = Limits(),
                ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
                pad_pool_bytes: int | None = None, max_batch: int = MAX_BATCH) -> None:
    """Serve the enclave. The same rule as `stip serve`: without a client token it binds loopback only."""
    import uvicorn

    from stip.common.hosts import is_loopback_host
    from stip.enclave.worker_link import WebSocketWorkerLink

    token = token or os.environ.get("STIP_TOKEN") or None
    check_bind(host, token)
    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise StipError("--ssl-certfile and --ssl-keyfile go together")
    bundle = Path(bundle)
    platform_key = Path(platform_key) if platform_key else bundle.parent / "tee-platform" / "platform.key"
    platform = SimulatedPlatform.load(platform_key)
    read_manifest(bundle, role="enclave", trusted=trusted)  # a bad bundle is refused before the worker is contacted
    link = WebSocketWorkerLink(worker, token=worker_token)
    enclave = SimulatedEnclave(bundle, platform, link, trusted=trusted, limits=limits, pad_pool_bytes=pad_pool_bytes,
                               max_batch=max_batch)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.warning("SIMULATED enclave: an ordinary process, no hardware protection (docs/tee.md); measurement %s",
                enclave.measurement)
    if not token:
        log.warning("no client token: serving on loopback %s only, without authentication", host)
    elif not ssl_certfile and not is_loopback_host(host):
        log.warning("serving on %s without TLS: the channel is end-to-end encrypted, but the client token is not; "
                    "put a TLS-terminating proxy in front, or pass --ssl-certfile", host)
    uvicorn.run(create_app(enclave, token, limits, max_batch), host=host, port=port, log_level=log_level,
                ws_max_size=64 * 1024 * 1024, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
