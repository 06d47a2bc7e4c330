"""`stip serve --tee-worker`: the worker's HTTP face, /health and one WebSocket for the enclave.

    WebSocket /v1/tee/worker (the server's auth: token or API keys), STIP frames (stip.common.wire):
    {"op": "linear", "name": "<block-0 linear>" | "lm_head", "dtype": "float64", "shape": [n, d_in]} + rows
        -> {"ok": true, "kind": "linear", "dtype": "float64", "shape": [n, d_out], "worker_ms"} + W x + b
    {"op": "body", "session": id, "start": position, "dtype": "float32", "shape": [T, d]} + h1 p
        -> {"ok": true, "kind": "hidden", "dtype": "float32", "shape": [T, d], "position", "worker_ms"} + states
    {"op": "bodies", "spans": [[session, start, T], ...], "dtype": "float32", "shape": [sum T, d]} + their h1 p
        -> {"ok": true, "kind": "hidden", "shape": [k, d], "index": [...], "failed": [{"index", "status",
        "error"}], "worker_ms"} + the last state of each of the k spans in "index": several sessions' steps in one
        packed forward (a span that fails fails alone)
    {"op": "close", "session": id} -> {"ok": true, "kind": "closed"}
    {"op": "info"} -> {"ok": true, "kind": "info", "bundle_id", "lm_head": "worker" | "enclave", "ops"}: the
        enclave checks at start that the worker serves the TEE worker bundle of its own `stip protect --tee` run
    errors: {"ok": false, "status": 4xx/5xx, "error": "..."}; the socket stays usable.

Compute runs on one worker thread, except a decode step's padded linears (at most `INLINE_ROWS` rows), which the
event loop answers itself; the event loop otherwise only authenticates and frames. With `--capture DIR` each socket
gets a recorder (stip.server.tee_capture) that writes what the worker receives, for the audit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi import FastAPI, WebSocket
from starlette.websockets import WebSocketDisconnect

from stip.common import wire
from stip.common.tee.layout import LM_HEAD
from stip.server.auth import Authenticator, AuthError
from stip.server.tee_worker import TeeWorker, TeeWorkerError

log = logging.getLogger("stip.server")

TEE_WORKER_PATH = "/v1/tee/worker"
TEE_DTYPES = {**wire.DTYPES, "float64": torch.float64}  # the padded linears travel in float64 (exactness)
TEE_OPS = ("linear", "body", "bodies", "close", "info")
MAX_ROWS = 1 << 16  # rows of one linear request
INLINE_ROWS = 64  # padded-linear requests of at most this many rows (a decode step's) run on the event loop: the
# hop to the compute thread and back costs more than their product (a fraction of a millisecond)


def _parse(worker: TeeWorker, data) -> tuple[str, dict, torch.Tensor | None]:
    if data is None:
        raise TeeWorkerError(400, "expected binary STIP frames, got text")
    try:
        header, payload = wire.decode_frame(data)
    except wire.WireError as e:
        raise TeeWorkerError(e.status, str(e)) from None
    op = header.get("op")
    if op not in TEE_OPS:
        raise TeeWorkerError(400, f"unknown op {str(op)[:40]!r}; expected one of {', '.join(TEE_OPS)}")
    if op in ("close", "info"):
        return op, header, None
    dtype = TEE_DTYPES.get(header.get("dtype")) if isinstance(header.get("dtype"), str) else None
    if dtype is None:
        raise TeeWorkerError(422, f"unsupported dtype; expected one of {', '.join(TEE_DTYPES)}")
    shape = header.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)):
        raise TeeWorkerError(422, f"shape must be [rows, columns] of positive integers, got {str(shape)[:80]}")
    if op == "linear":
        if not isinstance(header.get("name"), str):
            raise TeeWorkerError(422, "linear needs the name of a block-0 linear or 'lm_head'")
        d_in = worker.shape_of(header["name"])[1]
        if shape[1] != d_in or shape[0] > MAX_ROWS:
            raise TeeWorkerError(422, f"linear {header['name']!r} takes at most {MAX_ROWS} rows of {d_in}, "
                                      f"got {shape}")
    elif op == "bodies":
        _check_spans(worker, header.get("spans"), shape)
    else:
        if not isinstance(header.get("session"), str) or not 1 <= len(header["session"]) <= 64:
            raise TeeWorkerError(422, "body needs a session id (a string of 1-64 characters)")
        start = header.get("start")
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise TeeWorkerError(422, "body needs the start position (an integer >= 0)")
        if shape[1] != worker.hidden_size or shape[0] > worker.max_seq_len:
            raise TeeWorkerError(422, f"body takes at most {worker.max_seq_len} hidden states of size "
                                      f"{worker.hidden_size}, got {shape}")
    if len(payload) != shape[0] * shape[1] * dtype.itemsize:
        raise TeeWorkerError(422, f"payload is {len(payload)} bytes, shape {shape} in {header['dtype']} needs "
                                  f"{shape[0] * shape[1] * dtype.itemsize}")
    return op, header, wire.tensor_from_bytes(payload, dtype, shape)


def _check_spans(worker: TeeWorker, spans, shape: list[int]) -> None:
    """A "bodies" request's spans: [session (1-64 characters), start >= 0, rows >= 1], rows adding up to the
    payload's, at most the worker's session limit, hidden size the worker's."""
    def ok(n, low):
        return isinstance(n, int) and not isinstance(n, bool) and n >= low

    if not (isinstance(spans, list) and 1 <= len(spans) <= worker.max_sessions and all(
            isinstance(sp, list) and len(sp) == 3 and isinstance(sp[0], str) and 1 <= len(sp[0]) <= 64
            and ok(sp[1], 0) and ok(sp[2], 1) for sp in spans)):
        raise TeeWorkerError(422, f"bodies needs spans [[session, start, rows], ...] (1 to {worker.max_sessions}; "
                                  "session 1-64 characters, start >= 0, rows >= 1)")
    if sum(sp[2] for sp in spans) != shape[0] or shape[1] != worker.hidden_size or shape[0] > worker.max_seq_len \
            * len(spans):
        raise TeeWorkerError(422, f"bodies: the spans' rows must add up to the payload's {shape[0]} rows of size "
                                  f"{worker.hidden_size}")


def _bodies(worker: TeeWorker, header: dict, x: torch.Tensor, recorder) -> tuple[torch.Tensor, dict]:
    """Run a "bodies" request: the last state of each span that ran, which spans those are, and which failed."""
    parts, a = [], 0
    for sid, start, n in header["spans"]:
        parts.append((sid, x[a:a + n].float(), start))
        a += n
    if recorder is None:
        results = worker.bodies(parts)
    else:  # capture records one step at a time (the serial path)
        results = []
        for sid, h, start in parts:
            try:
                results.append(recorder.body(sid, start, h, functools.partial(worker.body, sid, h, start))[-1:])
            except TeeWorkerError as e:
                results.append(e)
    done = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
    failed = [{"index": i, "status": getattr(r, "status", 500), "error": str(r)[:200]}
              for i, r in enumerate(results) if isinstance(r, BaseException)]
    y = torch.cat([results[i] for i in done]) if done else torch.zeros(0, worker.hidden_size)
    return y, {"index": done, "failed": failed}


def _run(worker: TeeWorker, op: str, header: dict, x: torch.Tensor | None, recorder=None) -> bytes:
    """One request on the worker thread; `recorder` (a `TeeConnectionRecorder`, with --capture) sees each request
    the worker answers."""
    t0 = time.perf_counter()
    if op == "close":
        worker.close(str(header.get("session", "")))
        if recorder is not None:
            recorder.close(str(header.get("session", "")))
        return wire.encode_frame({"ok": True, "kind": "closed"})
    if op == "info":
        return wire.encode_frame({"ok": True, "kind": "info", "bundle_id": worker.manifest.get("bundle_id"),
                                  "lm_head": "worker" if LM_HEAD in worker.linears else "enclave",
                                  "ops": list(TEE_OPS)})
    if op == "linear":
        y = worker.linear(header["name"], x.to(torch.float64))
        if recorder is not None:
            recorder.linear(header["name"], x.to(torch.float64))
        kind, extra = "linear", {}
    elif op == "bodies":
        y, extra = _bodies(worker, header, x, recorder)
        kind = "hidden"
    else:
        h = x.float()
        run = functools.partial(worker.body, header["session"], h, header["start"])
        y = run() if recorder is None else recorder.body(header["session"], header["start"], h, run)
        kind, extra = "hidden", {"position": header["start"] + int(x.shape[0])}
    ms = round((time.perf_counter() - t0) * 1000, 3)
    return wire.encode_frame({"ok": True, "kind": kind, "dtype": wire.DTYPE_NAMES.get(y.dtype, "float64"),
                              "shape": [int(n) for n in y.shape], "worker_ms": ms, **extra}, wire.tensor_bytes(y))


def create_tee_app(worker: TeeWorker, auth: Authenticator, capture=None) -> FastAPI:
    """The worker's app; `capture` (a `stip.server.tee_capture.TeeCapture`, or None: off) records each socket."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stip-tee-worker")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="STIP TEE worker", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    async def health():
        return {"status": "ok", "engine": "TeeWorker", "mode": "tee-worker", "batch_size": 0, "queue": 0}

    @app.websocket(TEE_WORKER_PATH)
    async def tee_socket(websocket: WebSocket):
        try:
            auth.authenticate(websocket.headers.get("authorization"))
        except AuthError as e:
            from stip.server.refusals import refused

            await websocket.send_denial_response(refused(e.status, str(e)))
            return
        await websocket.accept()
        loop = asyncio.get_running_loop()
        recorder = None if capture is None else capture.connection()
        try:
            while True:
                msg = await websocket.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                try:
                    op, header, x = _parse(worker, msg.get("bytes"))
                    if recorder is None and (op in ("close", "info") or op == "linear" and x.shape[0] <= INLINE_ROWS):
                        reply = _run(worker, op, header, x)
                    else:
                        reply = await loop.run_in_executor(pool, _run, worker, op, header, x, recorder)
                except TeeWorkerError as e:
                    log.info("tee-worker request error %d: %s", e.status, e)
                    reply = wire.encode_frame(wire.error_header(e.status, str(e)))
                except Exception as e:  # noqa: BLE001 - one bad step must not stop the worker
                    log.exception("tee-worker failure")
                    reply = wire.encode_frame(wire.error_header(500, f"internal error ({type(e).__name__})"))
                await websocket.send_bytes(reply)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
        finally:
            if recorder is not None:  # the step in flight when the enclave went away
                with contextlib.suppress(RuntimeError):
                    await loop.run_in_executor(pool, recorder.close)

    return app


def serve_tee_worker(bundle, host: str, port: int, token: str | None, api_keys=None, max_sessions: int = 64,
                     max_seq_len: int = 4096, session_ttl: float = 300.0, dtype: torch.dtype = torch.float32,
                     device: str = "cpu", trusted=None, log_level: str = "info", ssl_certfile: str | None = None,
                     ssl_keyfile: str | None = None, kv_budget_tokens: int | None = None,
                     kv_budget_bytes: int | None = None, capture=None, capture_layers: list[int] | None = None) -> None:
    """Load the server bundle as a TEE worker and serve the enclave's WebSocket until interrupted. The KV budget
    (default: max_sessions x max_seq_len tokens) bounds blocks 1..L-1's caches of all sessions together. `capture`:
    record what the worker receives to that folder (stip.server.tee_capture; off by default)."""
    import uvicorn
    from transformers import AutoConfig

    from stip.server.engine import kv_bytes_per_token

    if kv_budget_tokens is None and kv_budget_bytes is not None:
        per_token = kv_bytes_per_token(AutoConfig.from_pretrained(bundle), dtype)
        kv_budget_tokens = max(1, kv_budget_bytes // per_token)
    worker = TeeWorker.from_bundle(bundle, dtype=dtype, device=device, trusted=trusted, max_sessions=max_sessions,
                                   max_seq_len=max_seq_len, session_ttl=session_ttl,
                                   kv_budget_tokens=kv_budget_tokens)
    recording = None
    if capture is not None:
        from stip.server.tee_capture import enable_tee_capture

        recording = enable_tee_capture(worker, capture, capture_layers)
    app = create_tee_app(worker, Authenticator(token, api_keys), recording)
    log.info("STIP TEE worker: bundle %s, %d offloaded linears, d=%d, max %d sessions, max_seq_len %d, KV budget %d "
             "tokens", worker.manifest.get("bundle_id", "?"), len(worker.linears), worker.hidden_size, max_sessions,
             worker.max_seq_len, worker.kv_budget_tokens)
    widest = max([worker.hidden_size] + [int(w.shape[1]) for w, _ in worker.linears.values()])
    limit = worker.max_seq_len * widest * 8 + wire.MAX_HEADER_BYTES + 4  # a whole prompt's rows in float64
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                                  ws_max_size=limit, ws_per_message_deflate=False, ssl_certfile=ssl_certfile,
                                  ssl_keyfile=ssl_keyfile, timeout_graceful_shutdown=5)).run()
