"""POST /v1/encode: one-shot requests to an encoder or classifier (see `stip.common.wire` for the frame).

Request: one frame, header {"op": "encode", "dtype": ..., "shape": [B, T, d], "mask": bool}, payload the embeddings
[B, T, d] in `dtype` (already in the secret basis), then, with a mask, uint8 [B, T] (1 = token, 0 = padding).
Reply 200: one frame {"ok": true, "kind": "hidden" | "logits", "shape": [...], "dtype": "float32"} ("server_ms" too
with `stip serve --expose-timing`) and the float32 output. Errors: the JSON error of the other endpoints.
Everything is checked on the event loop before any compute; the forward runs on the server's worker thread, one
request at a time. The same API keys, quotas and token budget as sessions apply: a request holds B x T tokens while
it runs, and counts them against its context's rekey budget (`stip.server.key_usage`).
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from stip.common import wire
from stip.common.generate import GENERATE_PATH
from stip.server.auth import AuthError
from stip.server.budget import AdmissionError
from stip.server.contexts import ContextError
from stip.server.encoder import REPLY_KIND, EncoderEngine
from stip.server.refusals import admission_refused

log = logging.getLogger("stip.server")

ENCODE_PATH = wire.ENCODE_PATH
HEADER_SLACK = 64 * 1024


class EncodeError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def request_limit(engine: EncoderEngine, max_message_bytes: int | None) -> int:
    """The largest request body: the operator's --max-message-bytes, else a full batch of float32 embeddings."""
    if max_message_bytes:
        return max_message_bytes
    return engine.max_batch * (engine.max_positions or 512) * (engine.hidden_size * 4 + 1) + HEADER_SLACK


def parse(engine: EncoderEngine, body: bytes, max_reply_bytes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A request frame -> (embeddings [B, T, d], mask [B, T] or None); EncodeError names what is wrong."""
    try:
        header, payload = wire.decode_frame(body)
    except wire.WireError as e:
        raise EncodeError(e.status, str(e)) from None
    if header.get("op") != "encode":
        raise EncodeError(400, f"{ENCODE_PATH} takes op 'encode', got {str(header.get('op'))[:40]!r}")
    dtype = wire.DTYPES.get(header.get("dtype", "float32"))
    if dtype is None:
        raise EncodeError(422, f"dtype must be one of {', '.join(wire.DTYPES)}")
    shape = header.get("shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(s) is int and s > 0 for s in shape)):
        raise EncodeError(422, "shape must be [batch, tokens, hidden] of positive integers")
    b, t, d = shape
    if d != engine.hidden_size:
        raise EncodeError(422, f"embeddings have hidden size {d}; this model's is {engine.hidden_size}")
    if b > engine.max_batch:
        raise EncodeError(413, f"a batch of {b} exceeds this server's limit of {engine.max_batch} per request")
    if engine.max_positions and t > engine.max_positions:
        raise EncodeError(413, f"{t} tokens per sequence exceed the model's limit of {engine.max_positions}")
    reply = 4
    for n in engine.reply_shape(b, t):
        reply *= n
    if reply > max_reply_bytes:
        raise EncodeError(413, f"the reply would take {reply} bytes, over the server's limit of {max_reply_bytes}; "
                               "send fewer or shorter sequences")
    mask_flag = header.get("mask", False)
    if not isinstance(mask_flag, bool):
        raise EncodeError(422, "mask must be true or false")
    size = b * t * d * dtype.itemsize
    expected = size + (b * t if mask_flag else 0)
    if len(payload) != expected:
        raise EncodeError(400, f"payload has {len(payload)} bytes; shape {shape} in {header.get('dtype', 'float32')}"
                               f"{' plus a uint8 mask' if mask_flag else ''} needs {expected}")
    x = wire.tensor_from_bytes(payload[:size], dtype, shape)
    if not bool(torch.isfinite(x).all()):
        raise EncodeError(422, "the embeddings hold NaN or infinite values")
    mask = None
    if mask_flag:
        mask = wire.tensor_from_bytes(payload[size:], torch.uint8, [b, t])
        if bool((mask > 1).any()):
            raise EncodeError(422, "mask values must be 0 (padding) or 1 (token)")
        if bool((mask.sum(dim=1) == 0).any()):
            raise EncodeError(422, "every sequence needs at least one token (a mask row of zeros has none)")
    return x, mask


def add_encode_route(app: FastAPI, contexts) -> None:
    """POST /v1/encode on a one-shot server (to the context the request names, `stip.server.contexts`); on a decoder
    server it answers 400 naming the model's task."""
    metrics = contexts.first.metrics  # shared by all contexts

    def bad(status: int, message: str) -> JSONResponse:
        metrics.errors.labels(str(status)).inc()
        log.info("encode request error %d: %s", status, message)  # shapes and limits only, never values
        headers = {"WWW-Authenticate": "Bearer"} if status in (401, 403) else {}
        return JSONResponse({"ok": False, "status": status, "error": message}, status_code=status, headers=headers)

    @app.post(ENCODE_PATH)
    async def encode(request: Request):
        try:
            who = contexts.first.auth.authenticate(request.headers.get("authorization"))
            service = contexts.pick(request.headers)
        except (AuthError, ContextError) as e:
            return bad(e.status, str(e))
        engine = service.engine
        if not isinstance(engine, EncoderEngine):
            where = f"POST {GENERATE_PATH}" if service.mode == "server-decode" else f"sessions at {wire.SESSION_PATH}"
            return bad(400, f"this server serves a {service.task} model: it takes {where}, not one-shot "
                            f"{ENCODE_PATH} requests")
        limit = request_limit(engine, service.settings.max_message_bytes)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return bad(413, f"request body of {declared} bytes exceeds the server's limit of {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return bad(413, f"request body exceeds the server's limit of {limit} bytes")
        try:
            x, mask = parse(engine, bytes(body), service.settings.max_reply_bytes)
        except EncodeError as e:
            return bad(e.status, str(e))
        tokens = x.shape[0] * x.shape[1]
        try:
            service.admit_request(who, tokens)  # refused too on a context past its rekey budget (key_usage)
        except AdmissionError as e:
            if e.reason == "rekey_budget":  # no WWW-Authenticate: the key is fine, the context's key is spent
                metrics.errors.labels(str(e.status)).inc()
                return admission_refused(e)
            return bad(e.status, str(e))
        service.count_served(tokens)
        start = time.perf_counter()
        try:
            out = await asyncio.get_running_loop().run_in_executor(service.worker, engine.encode, x, mask)
        except Exception as e:  # noqa: BLE001 - this request fails alone; the server keeps serving
            log.exception("engine failure in an encode request")
            return bad(500, f"internal error in the model ({type(e).__name__})")
        finally:
            service.admission.close_session(who.name, tokens)  # returns the request's tokens to the budget
        ms = (time.perf_counter() - start) * 1000
        service.metrics.tokens.labels("encode").inc(tokens)
        service.metrics.steps.labels("encode").observe(ms / 1000)
        header = {"ok": True, "kind": REPLY_KIND[engine.task], "shape": list(out.shape), "dtype": "float32"}
        if service.settings.expose_timing:  # off by default (`stip serve --expose-timing`): a timing side channel
            header["server_ms"] = round(ms, 3)
        return Response(wire.encode_frame(header, wire.tensor_bytes(out)), media_type="application/octet-stream")
