"""The model server: FastAPI + uvicorn, one persistent binary WebSocket per session (see `stip.common.wire`).

The event loop only authenticates, frames and validates; every tensor operation (decoding the payload, the forward,
top-k, encoding the reply) runs on a single worker thread that owns the engine, so sessions interleave step by step
and torch keeps all cores for the one forward in flight (`--no-batching`). With batching (the default) each step in
flight gets its own worker thread instead, and the engine (`stip.server.scheduler`) merges them into one forward per
tick.

The server process is given only the server bundle path and never opens client files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from starlette.websockets import WebSocketDisconnect

from stip.common import wire
from stip.common.generate import GENERATE_PATH
from stip.common.hosts import is_loopback_host
from stip.common.tasks import ONE_SHOT_TASKS, TEXT_GENERATION
from stip.errors import StipError
from stip.server.auth import REVOCATION_POLL, Authenticator, AuthError, Principal, load_key_file
from stip.server.budget import Admission, AdmissionError, Quota, default_budget_tokens
from stip.server.contexts import ContextError, Contexts
from stip.server.encode_route import ENCODE_PATH, add_encode_route
from stip.server.engine import Engine, TokenEngine, TopK
from stip.server.generate_route import Generations, add_generate_route
from stip.server.metrics import Metrics
from stip.server.sessions import Session, SessionManager

log = logging.getLogger("stip.server")

HEADER_SLACK = 64 * 1024


@dataclass
class Settings:
    token: str | None = None
    api_keys: str | None = None  # path of a stip-apikeys file (stip.server.auth)
    max_sessions: int = 64
    max_seq_len: int = 4096
    session_ttl: float = 300.0
    max_message_bytes: int | None = None  # None: room for max_seq_len float32 embeddings
    max_reply_bytes: int = 512 * 1024 * 1024
    kv_budget_tokens: int | None = None  # None: max_sessions x max_seq_len (run_server derives it from memory)
    max_all_logits: int = 1 << 24  # T x V logits one positions="all" prefill may compute (64 MB of float32)
    client_quota: Quota = Quota()  # quotas of the single token, and of keys that set none
    expose_timing: bool = False  # send clients each step's server compute time ("server_ms"): a timing side channel


KEY_SHARE = 4  # by default one API key may hold at most 1/KEY_SHARE of the session slots and of the KV budget


def key_default_quota(client: Quota, max_sessions: int, budget_tokens: int) -> Quota:
    """The quota of an API key whose entry sets none: the operator's --client-max-* values, else a fair share, so
    that no single key can take every session slot or the whole KV budget for a TTL."""
    return Quota(client.max_sessions or max(1, max_sessions // KEY_SHARE),
                 client.max_tokens or max(1, budget_tokens // KEY_SHARE), client.max_tokens_per_minute)


class StepError(Exception):
    def __init__(self, status: int, message: str, fatal: bool = False):
        super().__init__(message)
        self.status, self.fatal = status, fatal


def _short(value, limit: int = 80) -> str:
    """repr for error messages, cut short: a hostile header must not come back to its sender a thousand times."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class StipService:
    """Everything one server process holds: engine, worker thread, sessions, metrics."""

    def __init__(self, engine: Engine, settings: Settings, bundle_id: str = "", *, auth: Authenticator | None = None,
                 admission: Admission | None = None, metrics: Metrics | None = None):
        """`auth`, `admission` and `metrics` are shared when one server serves several contexts
        (`stip.server.contexts`): one key file, one session limit and KV budget, one /metrics for all of them."""
        self.engine, self.settings, self.bundle_id = engine, settings, bundle_id
        limit = settings.max_seq_len
        if engine.max_positions:
            limit = min(limit, engine.max_positions)
        self.max_seq_len = limit
        self.mode = "server-decode" if isinstance(engine, TokenEngine) else "round-trip"
        self.task = getattr(engine, "task", TEXT_GENERATION)  # one-shot engines (stip.server.encoder) say theirs
        self.max_message_bytes = settings.max_message_bytes or (limit * (getattr(engine, "hidden_size", 0) or 1) * 4
                                                                + HEADER_SLACK)
        # One thread per step in flight where the engine batches concurrent steps (stip.server.scheduler), else one.
        self.worker = ThreadPoolExecutor(max_workers=max(1, min(getattr(engine, "concurrent_steps", 1),
                                                                settings.max_sessions + 1)),
                                         thread_name_prefix="stip-engine")
        self.admission = admission or Admission(settings.kv_budget_tokens or settings.max_sessions * limit,
                                                settings.max_sessions, engine.kv_bytes_per_token)
        self.auth = auth or Authenticator(settings.token, settings.api_keys, settings.client_quota,
                                          key_default_quota(settings.client_quota, settings.max_sessions,
                                                            self.admission.total))
        self._auth_generation = self.auth.generation
        self.sessions = SessionManager(getattr(engine, "new_state", lambda: None), self._free_state,
                                       settings.session_ttl)
        self.waiting = 0  # steps handed to the worker pool that have not started (the serial engine's queue)
        self._waiting_lock = threading.Lock()
        self.metrics = metrics or Metrics(lambda: len(self.sessions), lambda: self.sessions.kv_caches,
                                          lambda: self.sessions.kv_tokens, lambda: self.admission.used,
                                          lambda: self.admission.total, self.engine_stats)
        inner = engine  # the scheduler, possibly under a server-decode engine, feeds the rows-per-tick histogram
        while inner is not None and not hasattr(inner, "add_tick_observer"):
            inner = getattr(inner, "engine", None)
        if inner is not None:
            inner.add_tick_observer(self.metrics.tick_rows.observe)
        if hasattr(engine, "add_end_observer"):  # server-decode on our engine: each generation's real KV length
            engine.add_end_observer(self.metrics.generation_kv_tokens.observe)
        self.generations = Generations()  # running /v1/generate streams, cut when their key is revoked
        self._expiry_task: asyncio.Task | None = None

    # ------------------------------------------------------------ lifecycle

    def _free_state(self, s: Session) -> None:
        self.admission.close_session(s.owner, s.reserved)
        s.reserved = 0
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
        self.engine.close()

    async def _expiry_loop(self) -> None:
        period = max(0.05, min(REVOCATION_POLL, self.settings.session_ttl / 4))  # see auth.REVOCATION_BOUND
        while True:
            await asyncio.sleep(period)
            self.drop_revoked()
            n = self.sessions.expire()
            if n:
                self.metrics.sessions_closed.labels("expired").inc(n)
                log.info("expired %d idle session(s); %d open", n, len(self.sessions))

    # ------------------------------------------------------------ info

    def engine_stats(self) -> dict:
        """The engine's own figures (`Engine.stats`), its queue counting the steps still waiting for a worker."""
        stats = dict(self.engine.stats()) if hasattr(self.engine, "stats") else {}
        stats.setdefault("engine", type(self.engine).__name__)
        stats.setdefault("mode", "round-trip")
        stats["queue"] = int(stats.get("queue", 0)) + self.waiting
        return stats

    def health(self) -> dict:
        """Open to anyone: that the server is up, and the engine's load (name, mode, rows in the last tick, steps
        waiting). Counts of the whole server only: nothing per client, nothing secret."""
        st = self.engine_stats()
        return {"status": "ok", "engine": st["engine"], "mode": st["mode"],
                "batch_size": int(st.get("batch_size", 0)), "queue": st["queue"]}

    def info(self, who: Principal) -> dict:
        """The model, the limits, and the caller's own usage (never other clients'); needs auth."""
        e, q, u = self.engine, who.quota, self.admission.usage(who.name)
        return {"status": "ok", "bundle_id": self.bundle_id, "model_type": e.model_type, "mode": self.mode,
                "task": self.task,
                "hidden_size": getattr(e, "hidden_size", None), "vocab_size": e.vocab_size,
                "signer": (getattr(e, "manifest", None) or {}).get("signer", {}).get("fingerprint"),
                "protocol": wire.PROTOCOL_VERSION, "max_seq_len": self.max_seq_len,
                "max_message_bytes": self.max_message_bytes, "max_all_logits": self.settings.max_all_logits,
                "session_ttl": self.settings.session_ttl, "kv_budget_tokens": self.admission.total,
                "client": who.name, "sessions": u.sessions, "kv_tokens": u.tokens,
                "max_sessions": min(q.max_sessions or self.settings.max_sessions, self.settings.max_sessions),
                "max_tokens": min(q.max_tokens or self.admission.total, self.admission.total),
                "max_tokens_per_minute": q.max_tokens_per_minute}

    def hello(self, s: Session) -> dict:
        return {"ok": True, "kind": "hello", "session": s.id, "position": s.position, "bundle_id": self.bundle_id,
                "hidden_size": self.engine.hidden_size, "vocab_size": self.engine.vocab_size,
                "max_seq_len": self.max_seq_len, "max_message_bytes": self.max_message_bytes,
                "protocol": wire.PROTOCOL_VERSION}

    def drop_revoked(self) -> None:
        """Re-read the key file if it changed; free the sessions and cut the running generations of clients that
        lost their key (whichever request or timer saw the change first)."""
        self.auth.refresh()
        if self.auth.generation != self._auth_generation:
            self._auth_generation = self.auth.generation
            for owner in self.sessions.owners() | self.generations.owners():
                if not self.auth.is_active(owner):
                    gone = self.sessions.owned_by(owner)
                    for s in gone:
                        self.sessions.remove(s, "revoked")
                    self.metrics.sessions_closed.labels("revoked").inc(len(gone))
                    cut = self.generations.cut(owner)
                    log.info("closed %d session(s) and %d generation(s) of a revoked client", len(gone), cut)

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
            raise StepError(400, f"unknown op {_short(op)}; expected one of {', '.join(wire.OPS)}")
        if op == "close":
            return op, {}, payload
        dtype_name = header.get("dtype", "float32")
        if not isinstance(dtype_name, str) or dtype_name not in wire.DTYPES:
            raise StepError(422, f"unsupported dtype {_short(dtype_name)}; expected one of {', '.join(wire.DTYPES)}")
        dtype = wire.DTYPES[dtype_name]
        shape = header.get("shape")
        if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                  for n in shape):
            raise StepError(422, f"shape must be a list of non-negative integers, got {_short(shape)}")
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
            raise StepError(422, f"positions must be 'last' or 'all', got {_short(positions)}")
        downlink = header.get("downlink", {"kind": "topk", "k": 64})
        if not isinstance(downlink, dict) or downlink.get("kind") not in wire.DOWNLINKS:
            raise StepError(422, f"downlink must be {{'kind': 'logits'}} or {{'kind': 'topk', 'k': K}}, "
                                 f"got {_short(downlink)}")
        k = 0
        if downlink["kind"] == "topk":
            k = downlink.get("k", 64)
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise StepError(422, f"top-k downlink needs an integer k >= 1, got {_short(k)}")
            k = min(k, self.engine.vocab_size)
        top_limit = getattr(self.engine, "max_top_k", None)  # an engine that returns `TopK`, never all V logits
        if top_limit is not None and (k == 0 or k > top_limit):
            raise StepError(400, f"this server's engine returns the top {top_limit} logits per step only: use a "
                                 f"top-k downlink with k <= {top_limit}" + ("" if k else ", not full logits"))
        if top_limit is not None and op == "prefill" and positions == "all":
            raise StepError(400, "this server's engine returns the last position's top-k only: use positions='last'")
        if op == "decode" and s.position == 0:
            raise StepError(409, "decode before prefill: the session's KV cache is empty; send a prefill first")
        if s.position + t > self.max_seq_len:
            raise StepError(413, f"sequence would reach {s.position + t} tokens; this server's max_seq_len is "
                                 f"{self.max_seq_len}")
        n = t if (op == "prefill" and positions == "all") else 1
        if n * self.engine.vocab_size > self.settings.max_all_logits:
            limit = self.settings.max_all_logits // self.engine.vocab_size
            raise StepError(413, f"positions='all' over {t} tokens would compute {t} x {self.engine.vocab_size} "
                                 f"logits, over this server's max_all_logits of {self.settings.max_all_logits} "
                                 f"(at most {limit} tokens per all-positions prefill); send fewer tokens per "
                                 f"request or positions='last'")
        reply = n * (self.engine.vocab_size * 4 if k == 0 else k * 8 + 4)
        if reply > self.settings.max_reply_bytes:
            raise StepError(413, f"the reply would be {reply} bytes (over {self.settings.max_reply_bytes}); use a "
                                 f"top-k downlink or positions='last'")
        return op, {"dtype": dtype, "shape": shape, "all": positions == "all", "k": k, "tokens": t}, payload

    def run_step(self, s: Session, op: str, req: dict, payload: memoryview) -> tuple[dict, list[bytes]]:
        """On the worker thread: payload -> tensor -> forward -> downlink bytes."""
        with self._waiting_lock:
            self.waiting -= 1
        t0 = time.perf_counter()
        x = wire.tensor_from_bytes(payload, req["dtype"], req["shape"])
        if not bool(torch.isfinite(x).all()):
            raise StepError(422, "embeddings contain NaN or Inf values")
        if s.closed:
            raise self.gone(s)
        before = self.engine.length(s.state)
        try:
            if op == "prefill":
                logits = self.engine.prefill(s.state, x, all_positions=req["all"])
            else:
                logits = self.engine.decode(s.state, x.reshape(1, -1))
        except Exception as e:
            if s.closed:  # freed under the queued step (its key revoked, or closed): not the model's fault
                raise self.gone(s) from None
            # The KV cache may hold part of this step: the session cannot continue exactly.
            log.exception("engine failure in a %s step (session dropped)", op)
            raise StepError(500, f"internal error in the model ({type(e).__name__}); the session was dropped",
                            fatal=True) from None
        t = self.engine.length(s.state) - before
        k = req["k"]
        if isinstance(logits, TopK):  # parse_request allowed only top-k downlinks with k <= the engine's
            parts = [wire.tensor_bytes(logits.indices[:, :k].to(torch.int32)),
                     wire.tensor_bytes(logits.values[:, :k].contiguous()), wire.tensor_bytes(logits.logsumexp)]
            shape, kind = [int(logits.values.shape[0]), k], "topk"
        elif k:
            values, indices = torch.topk(logits, k, dim=-1)
            parts = [wire.tensor_bytes(indices.to(torch.int32)), wire.tensor_bytes(values),
                     wire.tensor_bytes(torch.logsumexp(logits.float(), dim=-1))]
            shape, kind = [int(logits.shape[0]), k], "topk"
        else:
            parts = [wire.tensor_bytes(logits)]
            shape, kind = [int(n) for n in logits.shape], "logits"
        ms = (time.perf_counter() - t0) * 1000
        self.metrics.steps.labels(op).observe(ms / 1000)
        self.metrics.tokens.labels(op).inc(t)
        header = {"ok": True, "kind": kind, "shape": shape, "dtype": "float32", "position": self.engine.length(s.state)}
        if self.settings.expose_timing:  # off by default: per-step times let a key holder probe shared caches
            header["server_ms"] = round(ms, 3)
        return header, parts

    @staticmethod
    def gone(s: Session) -> StepError:
        """The answer to a step on a session that was freed, also one queued when that happened: 403 if its key was
        revoked (as the key's next request gets), else 404."""
        if s.closed_by == "revoked":
            return StepError(403, "this API key was revoked: its sessions were closed", fatal=True)
        return StepError(404, "session expired or was closed; open a new session", fatal=True)

    def authorize(self, authorization: str | None) -> Principal:
        """The caller of a step: a key revoked since the socket opened ends the session (403, fatal); an unreadable
        key file (503) only refuses the step."""
        try:
            return self.auth.authenticate(authorization)
        except AuthError as e:
            raise StepError(e.status, str(e), fatal=e.status in (401, 403)) from None

    def admit(self, s: Session, who: Principal, tokens: int) -> None:
        """Reserve the step's KV tokens before it runs (on the loop, so concurrent steps cannot overshoot)."""
        try:
            self.admission.reserve(s.owner, who.quota, tokens)
        except AdmissionError as e:
            self.metrics.refused.labels(e.reason).inc()
            raise StepError(e.status, str(e)) from None
        s.reserved += tokens

    def admit_request(self, who: Principal, tokens: int) -> None:
        """A request that lives for one HTTP call (/v1/generate, /v1/encode): it takes one of the caller's session
        slots and reserves all its tokens up front, or raises AdmissionError (counted in /metrics) holding nothing.
        The caller returns both with `admission.close_session(who.name, tokens)`."""
        try:
            self.admission.open_session(who.name, who.quota)
        except AdmissionError as e:
            self.metrics.refused.labels(e.reason).inc()
            raise
        try:
            self.admission.reserve(who.name, who.quota, tokens)
        except AdmissionError as e:
            self.admission.close_session(who.name, 0)
            self.metrics.refused.labels(e.reason).inc()
            raise

    async def handle(self, s: Session, data, authorization: str | None = None) -> tuple[bytes, int | None]:
        """One request frame -> (reply frame, WebSocket close code if the socket must close afterwards)."""
        try:
            who = self.authorize(authorization)
            if s.closed:
                raise self.gone(s)
            try:
                op, req, payload = self.parse_request(s, data)
            except StepError:
                raise
            except Exception as e:  # a header of the wrong shape the checks above did not foresee: still its fault
                raise StepError(400, f"malformed request header ({type(e).__name__}: {_short(str(e))})") from None
            if op == "close":
                self.sessions.remove(s)
                self.metrics.sessions_closed.labels("closed").inc()
                return wire.encode_frame({"ok": True, "kind": "closed", "position": 0}), 1000
            self.admit(s, who, req["tokens"])
            s.busy = True
            try:
                with self._waiting_lock:
                    self.waiting += 1
                header, parts = await asyncio.get_running_loop().run_in_executor(
                    self.worker, self.run_step, s, op, req, payload)
                s.position = header["position"]
            finally:
                s.busy = False
                s.touch()
                if not s.closed:  # keep what the cache holds now, return the rest of the reservation
                    self.admission.release(s.owner, s.reserved - s.position)
                    s.reserved = s.position
            return wire.encode_frame(header, *parts), None
        except Exception as e:
            if not isinstance(e, StepError):
                log.exception("unexpected error while serving a request (session dropped)")
                e = StepError(500, f"internal server error ({type(e).__name__}); the session was dropped",
                              fatal=True)
            if e.fatal and not s.closed:
                self.sessions.remove(s, "revoked" if e.status == 403 else "")
                self.metrics.sessions_closed.labels("revoked" if e.status == 403 else "error").inc()
            log.info("%s error %d: %s", "fatal" if e.fatal else "request", e.status, e)
            return self.error_frame(e.status, str(e), e.fatal), (4000 + e.status if e.fatal else None)

    def error_frame(self, status: int, message: str, fatal: bool = True) -> bytes:
        self.metrics.errors.labels(str(status)).inc()
        return wire.encode_frame(wire.error_header(status, message, fatal))


def refused(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status in (401, 403) else {"Retry-After": "5"}
    return JSONResponse({"ok": False, "status": status, "error": message}, status_code=status, headers=headers)


def no_context(e: ContextError) -> JSONResponse:
    """A request naming no context on a several-context server (400), or a bundle it does not serve (404)."""
    return JSONResponse({"ok": False, "status": e.status, "error": str(e)}, status_code=e.status)


def add_http_routes(app: FastAPI, contexts: Contexts) -> None:
    """/health for anyone (up or not, nothing else); /v1/info (of the context the request names), /v1/contexts and
    /metrics behind a key."""
    service = contexts.first  # auth and metrics are shared by all contexts

    def caller(request: Request) -> Principal:
        return service.auth.authenticate(request.headers.get("authorization"))

    @app.get("/health")
    async def health():
        return contexts.health()

    @app.get("/v1/info")
    async def info(request: Request):
        try:
            who = caller(request)
            return contexts.pick(request.headers).info(who)
        except AuthError as e:
            return refused(e.status, str(e))
        except ContextError as e:
            return no_context(e)

    @app.get("/v1/contexts")
    async def context_list(request: Request):
        try:
            caller(request)
        except AuthError as e:
            return refused(e.status, str(e))
        return contexts.listing()

    @app.get("/metrics")
    async def metrics(request: Request):
        try:
            who = caller(request)
        except AuthError as e:
            return refused(e.status, str(e))
        if not who.metrics:
            return refused(403, "this API key may not read /metrics (server-wide counts); see `stip apikey create "
                                "--metrics`")
        return Response(service.metrics.render(), media_type=service.metrics.content_type)


def add_session_route(app: FastAPI, contexts: Contexts) -> None:
    """The session WebSocket: authenticate, pick the context the client names, open or resume (own sessions only),
    then one reply per frame."""

    async def refuse_frame(websocket: WebSocket, status: int, message: str) -> None:
        await websocket.send_bytes(contexts.first.error_frame(status, message))  # metrics are shared
        await websocket.close(4000 + status)

    @app.websocket(wire.SESSION_PATH)
    async def session_socket(websocket: WebSocket):
        authorization = websocket.headers.get("authorization")
        service = contexts.first  # auth and metrics are shared by all contexts
        try:
            who = service.auth.authenticate(authorization)
            service = contexts.pick(websocket.headers)
        except AuthError as e:
            service.metrics.errors.labels(str(e.status)).inc()
            await websocket.send_denial_response(refused(e.status, str(e)))
            return
        except ContextError as e:
            service.metrics.errors.labels(str(e.status)).inc()
            await websocket.send_denial_response(no_context(e))
            return
        await websocket.accept()
        if service.task in ONE_SHOT_TASKS:
            return await refuse_frame(websocket, 400, f"this server serves a {service.task} model: it takes "
                                                      f"one-shot requests at POST {ENCODE_PATH}, not sessions")
        if service.mode != "round-trip":
            return await refuse_frame(websocket, 400, f"this server runs a {service.mode} bundle: it takes token ids "
                                                      f"at POST {GENERATE_PATH}, not embedding sessions; use a "
                                                      f"client bundle from the same `stip protect --mode "
                                                      f"{service.mode}` run")
        sid = websocket.query_params.get("session")
        if sid is not None:
            s = service.sessions.get(sid, owner=who.name)  # another client's session is as unknown as none
            if s is None:
                return await refuse_frame(websocket, 404, "unknown or expired session")
            if s.attached:
                return await refuse_frame(websocket, 409, "session is in use by another connection")
        else:
            try:
                service.admission.open_session(who.name, who.quota)
            except AdmissionError as e:
                service.metrics.refused.labels(e.reason).inc()
                return await refuse_frame(websocket, e.status, str(e))
            s = service.sessions.create(who.name)
            if hasattr(service.engine, "bind_client"):  # vLLM: the prefix-cache salt of the session's key
                service.engine.bind_client(s.state, who.name)
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
                reply, close = await service.handle(s, data, authorization)
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


def build_contexts(engines: list[tuple[Engine, str]], settings: Settings) -> Contexts:
    """One `StipService` per (engine, bundle id). A single context is exactly the server of one bundle; several share
    one Authenticator, one Admission (--max-sessions and the KV budget, counted in tokens of the costliest context,
    and every client's quota across contexts) and one Metrics (sums over contexts)."""
    contexts = Contexts([e for e, _ in engines])
    if len(engines) == 1:
        contexts.add(StipService(engines[0][0], settings, engines[0][1]))
        return contexts
    limit = max(min(settings.max_seq_len, e.max_positions or settings.max_seq_len) for e, _ in engines)
    admission = Admission(settings.kv_budget_tokens or settings.max_sessions * limit, settings.max_sessions,
                          max(e.kv_bytes_per_token for e, _ in engines))
    auth = Authenticator(settings.token, settings.api_keys, settings.client_quota,
                         key_default_quota(settings.client_quota, settings.max_sessions, admission.total))
    metrics = Metrics(contexts.sessions, contexts.kv_caches, contexts.kv_tokens, lambda: admission.used,
                      lambda: admission.total, contexts.engine_stats)
    for engine, bundle_id in engines:
        contexts.add(StipService(engine, settings, bundle_id, auth=auth, admission=admission, metrics=metrics))
    return contexts


def create_app(engine: Engine | list[tuple[Engine, str]], settings: Settings, bundle_id: str = ""):
    """The server's app: one engine and its bundle id, or several contexts [(engine, bundle id), ...] side by side
    (`stip.server.contexts`)."""
    contexts = build_contexts(engine if isinstance(engine, list) else [(engine, bundle_id)], settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await contexts.start()
        try:
            yield
        finally:
            await contexts.stop()

    app = FastAPI(title="STIP model server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = contexts.first
    app.state.contexts = contexts

    add_http_routes(app, contexts)
    add_session_route(app, contexts)
    add_generate_route(app, contexts)
    add_encode_route(app, contexts)
    return app


def run_server(bundle: str | Path | list[str | Path], host: str = "127.0.0.1", port: int = 8000,
               token: str | None = None, max_sessions: int = 64, max_seq_len: int = 4096, session_ttl: float = 300.0,
               max_message_bytes: int | None = None, threads: int | None = None, log_level: str = "info",
               ssl_certfile: str | None = None, ssl_keyfile: str | None = None, dtype: str = "float32",
               device: str = "cpu", trusted=None, api_keys: str | Path | None = None,
               kv_budget_bytes: int | None = None, kv_budget_tokens: int | None = None,
               max_all_logits: int = Settings.max_all_logits, client_quota: Quota = Quota(),
               engine_kind: str = "transformers", prefill_chunk: int | None = None, batching: bool = True,
               vllm_options: dict | None = None, tee_worker: bool = False, capture: str | Path | None = None,
               capture_layers: str | list[int] | None = None, expose_timing: bool = False) -> None:
    """Load the server bundle (its signature checked against `trusted`, the developer's pinned signer(s), default
    $STIP_TRUSTED_SIGNERS) and serve it until interrupted. A list of bundles serves each as its own context, side by
    side (`stip.server.contexts`; transformers engine only). `capture`: record every step to that folder for
    `stip audit` (stip.server.capture; off by default). `expose_timing`: replies carry each step's server compute
    time (`stip serve --expose-timing`; off by default, since per-step times are a side channel on shared caches)."""
    import uvicorn

    token = token or os.environ.get("STIP_TOKEN") or None
    if not token and not api_keys and not is_loopback_host(host):
        raise StipError(f"refusing to listen on {host} without a token: anyone who can reach it could use the "
                        f"model. Pass --token (or set STIP_TOKEN) or --api-keys FILE, or bind to 127.0.0.1")
    if not token and not api_keys:
        log.warning("no token set: serving on loopback %s only, without authentication", host)
    elif not ssl_certfile and not is_loopback_host(host):
        log.warning("serving on %s without TLS: put a TLS-terminating proxy in front, or pass --ssl-certfile", host)
    for name, value in (("max_sessions", max_sessions), ("max_seq_len", max_seq_len),
                        ("kv_budget_bytes", 1 if kv_budget_bytes is None else kv_budget_bytes),
                        ("kv_budget_tokens", 1 if kv_budget_tokens is None else kv_budget_tokens),
                        ("max_all_logits", max_all_logits)):
        if value < 1:
            raise StipError(f"{name} must be at least 1, got {value}")
    if not (session_ttl > 0 and math.isfinite(session_ttl)):
        raise StipError(f"session_ttl must be a positive number of seconds, got {session_ttl}")
    if dtype not in wire.DTYPES:
        raise StipError(f"dtype must be one of {', '.join(wire.DTYPES)}, got {dtype!r}")
    if api_keys:
        load_key_file(api_keys)  # a bad key file stops here, before the model loads
    if threads:
        torch.set_num_threads(threads)
    bundles = list(bundle) if isinstance(bundle, (list, tuple)) else [bundle]
    if not bundles:
        raise StipError("no server bundle given")
    if len(bundles) > 1 and (tee_worker or engine_kind == "vllm"):
        raise StipError(f"several contexts in one server run on the transformers engine, not "
                        f"{'--tee-worker' if tee_worker else '--engine vllm'}: run one `stip serve` per bundle "
                        f"(docs/contexts.md)")
    bundle = bundles[0]
    if capture is None and capture_layers:
        raise StipError("--capture-layers needs --capture DIR")
    if capture is not None and (tee_worker or engine_kind != "transformers" or len(bundles) > 1):
        raise StipError("--capture records the client sessions of one bundle on the transformers engine (not "
                        "--tee-worker, --engine vllm or several contexts)")
    if capture is not None:  # refused before the model loads: bad layers, a folder in use
        from stip.server.capture import check_folder, parse_layers

        capture_layers = parse_layers(capture_layers) if isinstance(capture_layers, str) else capture_layers
        check_folder(capture)
    if tee_worker:  # TEE mode: the enclave's WebSocket instead of client sessions (stip.server.tee_route)
        if engine_kind != "transformers":
            raise StipError("--tee-worker runs the transformers engine only")
        from stip.server.tee_route import serve_tee_worker

        return serve_tee_worker(bundle, host, port, token, api_keys, max_sessions, max_seq_len, session_ttl,
                                wire.DTYPES[dtype], device, trusted, log_level, ssl_certfile, ssl_keyfile,
                                kv_budget_tokens, kv_budget_bytes)

    from stip.server.engine import load_engine

    engines: list = []
    for path in bundles:  # one model in memory per context
        e = load_engine(engine_kind, path, dtype=wire.DTYPES[dtype], device=device, chunk_tokens=prefill_chunk,
                        batching=batching, vllm_options=vllm_options, trusted=trusted)
        engines.append((e, e.manifest.get("bundle_id", "")))
        seen = [b for _, b in engines[:-1]]
        if engines[-1][1] in seen:
            for e, _ in engines:
                e.close()
            raise StipError(f"{path} is bundle {engines[-1][1]}, given twice: each context needs its own bundle "
                            f"(`stip rekey` issues a new one)")
    if capture is not None:  # stip serve --capture: off by default, and then nothing is wrapped
        from stip.server.capture import enable_capture

        try:
            engines[0] = (enable_capture(engines[0][0], capture, capture_layers), engines[0][1])
        except BaseException:
            engines[0][0].close()
            raise
    engine = engines[0][0]
    kv_bytes = max(e.kv_bytes_per_token for e, _ in engines)  # the budget counts tokens of the costliest context
    seq_len = max(min(max_seq_len, e.max_positions or max_seq_len) for e, _ in engines)
    if kv_budget_tokens is None and kv_budget_bytes is not None:
        kv_budget_tokens = max(1, kv_budget_bytes // kv_bytes)
    if kv_budget_tokens is None:
        kv_budget_tokens = default_budget_tokens(kv_bytes, max_sessions * seq_len, device)
    settings = Settings(token=token, api_keys=str(api_keys) if api_keys else None, max_sessions=max_sessions,
                        max_seq_len=max_seq_len, session_ttl=session_ttl, max_message_bytes=max_message_bytes,
                        kv_budget_tokens=kv_budget_tokens, max_all_logits=max_all_logits, client_quota=client_quota,
                        expose_timing=expose_timing)
    app = create_app(engines, settings)
    contexts: Contexts = app.state.contexts
    for service in contexts.services:
        engine = service.engine
        log.info("STIP server: %s model (d=%s, V=%d, %s on %s), bundle %s, max %d sessions, max_seq_len %d, "
                 "ttl %.0fs, torch threads %d", engine.model_type, getattr(engine, "hidden_size", "?"),
                 engine.vocab_size, dtype, device, service.bundle_id, max_sessions, service.max_seq_len, session_ttl,
                 torch.get_num_threads())
    if len(contexts) > 1:
        log.info("%d contexts side by side (one model each); requests name theirs in the %s header; sessions and "
                 "the KV budget are shared", len(contexts), wire.BUNDLE_HEADER)
    log.info("KV budget %d tokens (%.1f MB at %d bytes/token); clients: %s", kv_budget_tokens,
             kv_budget_tokens * kv_bytes / 1e6, kv_bytes,
             "API key file" + (" and the token" if token else "") if api_keys else
             ("one token" if token else "anyone on loopback"))
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
        # Larger messages than our limit still reach the app (which answers 413 and keeps the socket); only
        # absurd ones are cut by the protocol layer (close 1009).
        ws_max_size=2 * contexts.max_message_bytes + HEADER_SLACK, ws_per_message_deflate=False,
        ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise StipError(f"the server could not start on {host}:{port} (is the port in use?)")
