"""The model server: FastAPI + uvicorn, one persistent binary WebSocket per session (see `stip.common.wire`).

The event loop only authenticates, frames and validates; every tensor operation (decoding the payload, the forward,
top-k, encoding the reply) runs on a single worker thread that owns the engine, so sessions interleave step by step
and torch keeps all cores for the one forward in flight.

The server process is given only the server bundle path and never opens client files.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from starlette.websockets import WebSocketDisconnect

from stip.common import wire
from stip.errors import StipError
from stip.server.engine import Engine
from stip.server.metrics import Metrics
from stip.server.sessions import Session, SessionLimitError, SessionManager

log = logging.getLogger("stip.server")

HEADER_SLACK = 64 * 1024


@dataclass
class Settings:
    token: str | None = None
    max_sessions: int = 64
    max_seq_len: int = 4096
    session_ttl: float = 300.0
    max_message_bytes: int | None = None  # None: room for max_seq_len float32 embeddings
    max_reply_bytes: int = 512 * 1024 * 1024


class StepError(Exception):
    def __init__(self, status: int, message: str, fatal: bool = False):
        super().__init__(message)
        self.status, self.fatal = status, fatal


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class StipService:
    """Everything one server process holds: engine, worker thread, sessions, metrics."""

    def __init__(self, engine: Engine, settings: Settings, bundle_id: str = ""):
        self.engine, self.settings, self.bundle_id = engine, settings, bundle_id
        limit = settings.max_seq_len
        if engine.max_positions:
            limit = min(limit, engine.max_positions)
        self.max_seq_len = limit
        self.max_message_bytes = settings.max_message_bytes or (limit * engine.hidden_size * 4 + HEADER_SLACK)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stip-engine")
        self.sessions = SessionManager(engine.new_state, self._free_state, settings.max_sessions,
                                       settings.session_ttl)
        self.metrics = Metrics(lambda: len(self.sessions), lambda: self.sessions.kv_caches,
                               lambda: self.sessions.kv_tokens)
        self._expiry_task: asyncio.Task | None = None

    # ------------------------------------------------------------ lifecycle

    def _free_state(self, s: Session) -> None:
        self.worker.submit(self.engine.free, s.state)

    async def start(self) -> None:
        self._expiry_task = asyncio.create_task(self._expiry_loop())

    async def stop(self) -> None:
        if self._expiry_task:
            self._expiry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry_task
        self.sessions.clear()
        self.worker.shutdown(wait=False, cancel_futures=True)

    async def _expiry_loop(self) -> None:
        period = max(0.05, min(1.0, self.settings.session_ttl / 4))
        while True:
            await asyncio.sleep(period)
            n = self.sessions.expire()
            if n:
                self.metrics.sessions_closed.labels("expired").inc(n)
                log.info("expired %d idle session(s); %d open", n, len(self.sessions))

    # ------------------------------------------------------------ info

    def health(self) -> dict:
        e = self.engine
        return {"status": "ok", "bundle_id": self.bundle_id, "model_type": e.model_type,
                "hidden_size": e.hidden_size, "vocab_size": e.vocab_size, "sessions": len(self.sessions),
                "max_sessions": self.settings.max_sessions, "max_seq_len": self.max_seq_len,
                "max_message_bytes": self.max_message_bytes, "session_ttl": self.settings.session_ttl,
                "protocol": wire.PROTOCOL_VERSION}

    def hello(self, s: Session) -> dict:
        return {"ok": True, "kind": "hello", "session": s.id, "position": s.position, "bundle_id": self.bundle_id,
                "hidden_size": self.engine.hidden_size, "vocab_size": self.engine.vocab_size,
                "max_seq_len": self.max_seq_len, "max_message_bytes": self.max_message_bytes,
                "protocol": wire.PROTOCOL_VERSION}

    def check_token(self, authorization: str | None) -> int:
        """0 if allowed, else the HTTP status to refuse with (401 missing, 403 wrong)."""
        if not self.settings.token:
            return 0
        if not authorization:
            return 401
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value:
            return 401
        return 0 if hmac.compare_digest(value.strip().encode(), self.settings.token.encode()) else 403

    # ------------------------------------------------------------ steps

    def parse_request(self, s: Session, data) -> tuple[str, dict, memoryview]:
        """Validate a frame against the protocol and the session (on the loop: header checks only)."""
        if data is None:
            raise StepError(400, "expected binary frames: 4-byte length + JSON header + tensor bytes; got text")
        if len(data) > self.max_message_bytes:
            raise StepError(413, f"message of {len(data)} bytes exceeds the server's limit of "
                                 f"{self.max_message_bytes} bytes; send the prompt in several prefill chunks")
        try:
            header, payload = wire.decode_frame(data)
        except wire.WireError as e:
            raise StepError(e.status, str(e)) from None
        op = header.get("op")
        if op not in wire.OPS:
            raise StepError(400, f"unknown op {op!r}; expected one of {', '.join(wire.OPS)}")
        if op == "close":
            return op, {}, payload
        dtype_name = header.get("dtype", "float32")
        if dtype_name not in wire.DTYPES:
            raise StepError(422, f"unsupported dtype {dtype_name!r}; expected one of {', '.join(wire.DTYPES)}")
        dtype = wire.DTYPES[dtype_name]
        shape = header.get("shape")
        if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                  for n in shape):
            raise StepError(422, f"shape must be a list of non-negative integers, got {shape!r}")
        d = self.engine.hidden_size
        if op == "decode":
            if shape not in ([1, d], [d]):
                raise StepError(422, f"decode takes one embedding of shape [1, {d}] or [{d}], got {shape}")
            t = 1
        else:
            if len(shape) != 2:
                raise StepError(422, f"prefill takes embeddings of shape [T, {d}], got {shape}")
            if shape[1] != d:
                raise StepError(422, f"wrong hidden size {shape[1]}: this model's hidden size is {d}")
            t = shape[0]
            if t < 1:
                raise StepError(422, "prefill needs at least one embedding (T >= 1)")
        expected = t * d * dtype.itemsize
        if len(payload) != expected:
            raise StepError(422, f"payload is {len(payload)} bytes but shape {shape} in {dtype_name} needs "
                                 f"{expected} bytes")
        positions = header.get("positions", "last")
        if op == "prefill" and positions not in wire.POSITIONS:
            raise StepError(422, f"positions must be 'last' or 'all', got {positions!r}")
        downlink = header.get("downlink", {"kind": "topk", "k": 64})
        if not isinstance(downlink, dict) or downlink.get("kind") not in wire.DOWNLINKS:
            raise StepError(422, f"downlink must be {{'kind': 'logits'}} or {{'kind': 'topk', 'k': K}}, "
                                 f"got {downlink!r}")
        k = 0
        if downlink["kind"] == "topk":
            k = downlink.get("k", 64)
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise StepError(422, f"top-k downlink needs an integer k >= 1, got {k!r}")
            k = min(k, self.engine.vocab_size)
        if op == "decode" and s.position == 0:
            raise StepError(409, "decode before prefill: the session's KV cache is empty; send a prefill first")
        if s.position + t > self.max_seq_len:
            raise StepError(413, f"sequence would reach {s.position + t} tokens; this server's max_seq_len is "
                                 f"{self.max_seq_len}")
        n = t if (op == "prefill" and positions == "all") else 1
        reply = n * (self.engine.vocab_size * 4 if k == 0 else k * 8)
        if reply > self.settings.max_reply_bytes:
            raise StepError(413, f"the reply would be {reply} bytes (over {self.settings.max_reply_bytes}); use a "
                                 f"top-k downlink or positions='last'")
        return op, {"dtype": dtype, "shape": shape, "all": positions == "all", "k": k}, payload

    def run_step(self, s: Session, op: str, req: dict, payload: memoryview) -> tuple[dict, list[bytes]]:
        """On the worker thread: payload -> tensor -> forward -> downlink bytes."""
        t0 = time.perf_counter()
        x = wire.tensor_from_bytes(payload, req["dtype"], req["shape"])
        if not bool(torch.isfinite(x).all()):
            raise StepError(422, "embeddings contain NaN or Inf values")
        if s.closed:
            raise StepError(404, "session was closed or expired", fatal=True)
        before = self.engine.length(s.state)
        try:
            if op == "prefill":
                logits = self.engine.prefill(s.state, x, all_positions=req["all"])
            else:
                logits = self.engine.decode(s.state, x.reshape(1, -1))
        except Exception as e:
            # The KV cache may hold part of this step: the session cannot continue exactly.
            log.exception("engine failure in a %s step (session dropped)", op)
            raise StepError(500, f"internal error in the model ({type(e).__name__}); the session was dropped",
                            fatal=True) from None
        t = self.engine.length(s.state) - before
        k = req["k"]
        if k:
            values, indices = torch.topk(logits, k, dim=-1)
            parts = [wire.tensor_bytes(indices.to(torch.int32)), wire.tensor_bytes(values)]
            shape, kind = [int(logits.shape[0]), k], "topk"
        else:
            parts = [wire.tensor_bytes(logits)]
            shape, kind = [int(n) for n in logits.shape], "logits"
        ms = (time.perf_counter() - t0) * 1000
        self.metrics.steps.labels(op).observe(ms / 1000)
        self.metrics.tokens.labels(op).inc(t)
        return {"ok": True, "kind": kind, "shape": shape, "dtype": "float32",
                "position": self.engine.length(s.state), "server_ms": round(ms, 3)}, parts

    async def handle(self, s: Session, data) -> tuple[bytes, int | None]:
        """One request frame -> (reply frame, WebSocket close code if the socket must close afterwards)."""
        try:
            if s.closed:
                raise StepError(404, "session expired or was closed; open a new session", fatal=True)
            op, req, payload = self.parse_request(s, data)
            if op == "close":
                self.sessions.remove(s)
                self.metrics.sessions_closed.labels("closed").inc()
                return wire.encode_frame({"ok": True, "kind": "closed", "position": 0}), 1000
            s.busy = True
            try:
                header, parts = await asyncio.get_running_loop().run_in_executor(
                    self.worker, self.run_step, s, op, req, payload)
            finally:
                s.busy = False
                s.touch()
            s.position = header["position"]
            return wire.encode_frame(header, *parts), None
        except Exception as e:
            if not isinstance(e, StepError):
                log.exception("unexpected error while serving a request (session dropped)")
                e = StepError(500, f"internal server error ({type(e).__name__}); the session was dropped",
                              fatal=True)
            if e.fatal and not s.closed:
                self.sessions.remove(s)
                self.metrics.sessions_closed.labels("error").inc()
            log.info("%s error %d: %s", "fatal" if e.fatal else "request", e.status, e)
            return self.error_frame(e.status, str(e), e.fatal), (4000 + e.status if e.fatal else None)

    def error_frame(self, status: int, message: str, fatal: bool = True) -> bytes:
        self.metrics.errors.labels(str(status)).inc()
        return wire.encode_frame(wire.error_header(status, message, fatal))


def create_app(engine: Engine, settings: Settings, bundle_id: str = ""):
    service = StipService(engine, settings, bundle_id)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="STIP model server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    def refused(status: int) -> JSONResponse:
        msg = "missing bearer token" if status == 401 else "invalid bearer token"
        return JSONResponse({"ok": False, "status": status, "error": msg}, status_code=status,
                            headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/metrics")
    async def metrics(request: Request):
        status = service.check_token(request.headers.get("authorization"))
        if status:
            return refused(status)
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.websocket(wire.SESSION_PATH)
    async def session_socket(websocket: WebSocket):
        status = service.check_token(websocket.headers.get("authorization"))
        if status:
            service.metrics.errors.labels(str(status)).inc()
            await websocket.send_denial_response(refused(status))
            return
        await websocket.accept()
        sid = websocket.query_params.get("session")
        if sid is not None:
            s = service.sessions.get(sid)
            if s is None:
                await websocket.send_bytes(service.error_frame(404, "unknown or expired session"))
                await websocket.close(4404)
                return
            if s.attached:
                await websocket.send_bytes(service.error_frame(409, "session is in use by another connection"))
                await websocket.close(4409)
                return
        else:
            try:
                s = service.sessions.create()
            except SessionLimitError as e:
                await websocket.send_bytes(service.error_frame(429, str(e)))
                await websocket.close(4429)
                return
            service.metrics.sessions_opened.inc()
        s.attached = True
        s.touch()
        bytes_in = service.metrics.bytes.labels("in")
        bytes_out = service.metrics.bytes.labels("out")
        try:
            await websocket.send_bytes(wire.encode_frame(service.hello(s)))
            while True:
                msg = await websocket.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                data = msg.get("bytes")
                if data is not None:
                    bytes_in.inc(len(data))
                reply, close = await service.handle(s, data)
                bytes_out.inc(len(reply))
                await websocket.send_bytes(reply)
                if close is not None:
                    await websocket.close(close)
                    break
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the client went away: the session stays resumable until its TTL
        finally:
            s.attached = False
            s.touch()

    return app


def run_server(bundle: str | Path, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
               max_sessions: int = 64, max_seq_len: int = 4096, session_ttl: float = 300.0,
               max_message_bytes: int | None = None, threads: int | None = None, log_level: str = "info",
               ssl_certfile: str | None = None, ssl_keyfile: str | None = None, dtype: str = "float32",
               device: str = "cpu") -> None:
    """Load the server bundle and serve it until interrupted."""
    import uvicorn

    token = token or os.environ.get("STIP_TOKEN") or None
    if not token and not is_loopback(host):
        raise StipError(f"refusing to listen on {host} without a token: anyone who can reach it could use the "
                        f"model. Pass --token (or set STIP_TOKEN), or bind to 127.0.0.1")
    if not token:
        log.warning("no token set: serving on loopback %s only, without authentication", host)
    elif not ssl_certfile and not is_loopback(host):
        log.warning("serving on %s without TLS: put a TLS-terminating proxy in front, or pass --ssl-certfile", host)
    for name, value in (("max_sessions", max_sessions), ("max_seq_len", max_seq_len)):
        if value < 1:
            raise StipError(f"{name} must be at least 1, got {value}")
    if not (session_ttl > 0 and math.isfinite(session_ttl)):
        raise StipError(f"session_ttl must be a positive number of seconds, got {session_ttl}")
    if dtype not in wire.DTYPES:
        raise StipError(f"dtype must be one of {', '.join(wire.DTYPES)}, got {dtype!r}")
    if threads:
        torch.set_num_threads(threads)

    from stip.server.engine import TransformersEngine

    engine = TransformersEngine.from_bundle(bundle, dtype=wire.DTYPES[dtype], device=device)
    settings = Settings(token=token, max_sessions=max_sessions, max_seq_len=max_seq_len, session_ttl=session_ttl,
                        max_message_bytes=max_message_bytes)
    app = create_app(engine, settings, bundle_id=engine.manifest.get("bundle_id", ""))
    service: StipService = app.state.service
    log.info("STIP server: %s model (d=%d, V=%d, %s on %s), bundle %s, max %d sessions, max_seq_len %d, ttl %.0fs, "
             "torch threads %d", engine.model_type, engine.hidden_size, engine.vocab_size, dtype, device,
             service.bundle_id, max_sessions, service.max_seq_len, session_ttl, torch.get_num_threads())
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
        # Larger messages than our limit still reach the app (which answers 413 and keeps the socket); only
        # absurd ones are cut by the protocol layer (close 1009).
        ws_max_size=2 * service.max_message_bytes + HEADER_SLACK, ws_per_message_deflate=False,
        ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise StipError(f"the server could not start on {host}:{port} (is the port in use?)")
