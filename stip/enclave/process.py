"""`stip enclave DIR/enclave --worker URL`: the enclave as its own process, reachable only through messages.

`Enclave` is the interface a TEE backend implements: `attest(nonce)` (evidence binding the measurement, a fresh
X25519 channel key and the client's nonce), `open_channel(client_key, nonce)` and `generate(request)`. The backend
here, `SimulatedEnclave`, is an ordinary process on this machine (its own address space; the platform is a key file;
docs/tee.md says what that does not protect). It unseals its bundle with the platform's sealing secret, runs the
enclave's part of the model (stip.enclave.compute) and drives the GPU worker over the worker's WebSocket. Clients
reach it over HTTP (`POST /v1/attest`) and a WebSocket (`/v1/tee/session`) carrying channel-sealed JSON
(stip.common.tee_protocol). Nothing secret is logged: not tokens, not ids, not keys.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect

from stip.common.channel import NONCE_BYTES, Channel, new_keypair, public_bytes
from stip.common.files import read_manifest
from stip.common.layout import MODEL_CONFIG_FILE
from stip.common.sampling import Sampler, SamplingParams
from stip.common.tee_protocol import ATTEST_PATH, POLICY_VIOLATION, SESSION_PATH, TeeGenerateRequest
from stip.enclave.attestation import SimulatedPlatform, code_measurement, measurement, unb64
from stip.enclave.sealing import read_header, sealing_key, unseal_tensors
from stip.errors import StipError, TeeError

log = logging.getLogger("stip.enclave")

SEALED_FILE, ENCLAVE_CONFIG_FILE = "enclave.sealed", "stip_enclave.json"  # as stip.developer.tee writes them
PENDING_TTL_S = 60.0  # a report's channel key waits this long for its session
MAX_PENDING = 1024


class Enclave:
    """What a TEE backend provides. Everything crosses its boundary as messages (reports, sealed frames)."""

    measurement: str

    def attest(self, nonce: bytes) -> dict:
        """Evidence {format, evidence} binding `measurement`, a fresh channel public key and `nonce`."""
        raise NotImplementedError

    def open_channel(self, client_public: bytes, nonce: bytes) -> Channel:
        """The channel to the client that verified the report for `nonce` (each nonce opens one channel)."""
        raise NotImplementedError

    def generate(self, request: TeeGenerateRequest) -> Iterator[dict]:
        """GenerateChunk dicts, one per token, the last with finish_reason."""
        raise NotImplementedError


class SimulatedEnclave(Enclave):
    """The enclave in an ordinary local process, with a simulated platform (stip.enclave.attestation)."""

    def __init__(self, bundle: str | Path, platform: SimulatedPlatform, link, trusted=None):
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
        self.model = EnclaveModel.from_tensors(model_config, tensors, link)
        if hasattr(link, "expect_bundle"):  # the worker must hold this run's secret bases
            link.expect_bundle(self.manifest["bundle_id"], self.model.lm_head_local)
        self.vocab_size = int(self.model.vocab_size)
        self.max_positions = int(self.config.get("max_positions") or 0)
        self._pending: dict[bytes, tuple[object, float]] = {}
        self._lock = threading.Lock()
        self._step_lock = threading.Lock()  # one model step at a time (fresh pads, one worker socket)

    def attest(self, nonce: bytes) -> dict:
        if len(nonce) != NONCE_BYTES:
            raise TeeError(f"the nonce must be {NONCE_BYTES} random bytes")
        key = new_keypair()
        now = time.monotonic()
        with self._lock:
            self._pending = {n: v for n, v in self._pending.items() if now - v[1] < PENDING_TTL_S}
            if nonce in self._pending:
                raise TeeError("this nonce was already used; draw a fresh one for each attestation")
            if len(self._pending) >= MAX_PENDING:
                raise TeeError("too many attestations waiting for their session; retry shortly")
            self._pending[nonce] = (key, now)
        return {**self.platform.report(self.measurement, public_bytes(key), nonce), "measurement": self.measurement}

    def open_channel(self, client_public: bytes, nonce: bytes) -> Channel:
        with self._lock:
            entry = self._pending.pop(nonce, None)
        if entry is None or time.monotonic() - entry[1] >= PENDING_TTL_S:
            raise TeeError("no attestation is waiting for this nonce (unknown, already used or expired): call "
                           f"{ATTEST_PATH} first")
        key = entry[0]
        return Channel.derive(key, client_public, client_public=client_public, enclave_public=public_bytes(key),
                              nonce=nonce, measurement=self.measurement, role="enclave")

    def _step(self, fn, *args):
        with self._step_lock:
            return fn(*args)

    def generate(self, request: TeeGenerateRequest) -> Iterator[dict]:
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
        try:
            logits = self._step(m.prefill, session, torch.tensor(ids))
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
                logits = self._step(m.decode, session, token)
            t = session.timings
            yield {**chunk, "finish_reason": finish, "prompt_tokens": len(ids), "completion_tokens": n,
                   "timing": {"enclave_ms": 1e3 * t["enclave_s"], "worker_ms": 1e3 * t["worker_s"]}}
        finally:
            try:
                self._step(m.close, session)
            except Exception:  # noqa: BLE001 - the worker may be gone; its session expires there
                log.warning("could not close a session at the worker")


def authorized(header: str | None, token: str | None) -> bool:
    """The client's bearer token, if the enclave was given one (`stip enclave --token` / STIP_TOKEN)."""
    if not token:
        return True
    scheme, _, value = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def create_app(enclave: Enclave, token: str | None = None):
    """`token`: clients must send it (Authorization: Bearer) to attest and to open a session; None: any client that
    reaches the enclave may (docs/tee.md)."""
    app = FastAPI(title="STIP enclave", docs_url=None, redoc_url=None, openapi_url=None)
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="stip-enclave")
    denied = {"error": "missing or wrong client token (Authorization: Bearer; STIP_TOKEN)"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "role": "enclave", "measurement": enclave.measurement}

    @app.post(ATTEST_PATH)
    async def attest(request: Request):
        if not authorized(request.headers.get("authorization"), token):
            return JSONResponse(denied, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        try:
            body = await request.json()
            nonce = unb64(body.get("nonce") if isinstance(body, dict) else None, "nonce", NONCE_BYTES)
            return enclave.attest(nonce)
        except (TeeError, ValueError) as e:
            return JSONResponse({"error": f"attest: {e}"}, status_code=400)

    @app.websocket(SESSION_PATH)
    async def session(ws: WebSocket):
        if not authorized(ws.headers.get("authorization"), token):
            await ws.send_denial_response(JSONResponse(denied, status_code=401, headers={"WWW-Authenticate": "Bearer"}))
            return
        await ws.accept()
        loop = asyncio.get_running_loop()
        try:
            hello = json.loads(await ws.receive_text())
            channel = enclave.open_channel(unb64(hello.get("client_public_key"), "client_public_key", 32),
                                           unb64(hello.get("nonce"), "nonce", NONCE_BYTES))
        except (TeeError, ValueError, AttributeError, KeyError) as e:
            await ws.close(POLICY_VIOLATION, f"hello refused: {e}"[:120])
            return
        except WebSocketDisconnect:
            return
        try:
            while True:
                msg = await ws.receive_bytes()
                req = channel.open_json(msg)
                op = req.get("op") if isinstance(req, dict) else None
                if op == "close":
                    await ws.close()
                    return
                try:
                    gen_req = TeeGenerateRequest.model_validate(req)
                except ValidationError as e:
                    err = e.errors()[0]
                    await ws.send_bytes(channel.seal_json({"error": f"{'.'.join(map(str, err.get('loc', ())))}: "
                                                                    f"{err.get('msg')}", "status": 422}))
                    continue
                chunks = enclave.generate(gen_req)
                try:
                    while True:
                        chunk = await loop.run_in_executor(pool, next, chunks, None)
                        if chunk is None:
                            break
                        await ws.send_bytes(channel.seal_json(chunk))
                except ValueError as e:
                    await ws.send_bytes(channel.seal_json({"error": str(e), "status": 422}))
                except StipError as e:
                    log.warning("generation failed: %s", type(e).__name__)
                    await ws.send_bytes(channel.seal_json({"error": f"enclave: {e}", "status": 502}))
                finally:
                    await loop.run_in_executor(pool, chunks.close)
        except TeeError as e:
            log.info("session refused: %s", e)
            await ws.close(POLICY_VIOLATION, str(e)[:120])
        except WebSocketDisconnect:
            pass

    return app


def run_enclave(bundle: str | Path, worker: str, host: str = "127.0.0.1", port: int = 8100,
                platform_key: str | Path | None = None, worker_token: str | None = None, trusted=None,
                log_level: str = "info", token: str | None = None) -> None:
    import uvicorn

    from stip.enclave.worker_link import WebSocketWorkerLink

    bundle = Path(bundle)
    platform_key = Path(platform_key) if platform_key else bundle.parent / "tee-platform" / "platform.key"
    platform = SimulatedPlatform.load(platform_key)
    read_manifest(bundle, role="enclave", trusted=trusted)  # a bad bundle is refused before the worker is contacted
    link = WebSocketWorkerLink(worker, token=worker_token)
    enclave = SimulatedEnclave(bundle, platform, link, trusted=trusted)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.warning("SIMULATED enclave: an ordinary process, no hardware protection (docs/tee.md); measurement %s",
                enclave.measurement)
    if not token:
        log.warning("no client token (--token / STIP_TOKEN): any client that reaches this enclave may attest and "
                    "generate")
    uvicorn.run(create_app(enclave, token), host=host, port=port, log_level=log_level, ws_max_size=64 * 1024 * 1024)
