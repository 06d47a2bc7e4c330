"""`stip proxy`: an OpenAI-compatible endpoint on localhost that talks STIP to the model server.

Any OpenAI client (base_url=http://127.0.0.1:PORT/v1, any api_key) gets private inference unchanged: the proxy
tokenizes, embeds and permutes on this machine, and the server never sees text. `GET /v1/models`,
`POST /v1/chat/completions`, `POST /v1/completions`, streaming (SSE) or not. Each generation runs in its own
thread (the SDK is blocking) and stops when the HTTP client goes away. A chat request without max_tokens gets at
most 256 tokens; frequency/presence penalties are accepted and not applied (`repetition_penalty` and `top_k` are
taken as extensions, as vLLM does).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from stip.errors import StipError


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields (logit_bias, user, ...) are accepted, ignored

    model: str = "stip"
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: Optional[dict] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    frequency_penalty: Optional[float] = None  # accepted, not applied
    presence_penalty: Optional[float] = None  # accepted, not applied
    top_k: int = Field(0, ge=0)  # extensions, as vLLM takes them (extra_body)
    repetition_penalty: float = Field(1.0, gt=0.0)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: Optional[Union[str, list[dict[str, Any]]]] = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int]]
    max_tokens: Optional[int] = Field(16, ge=1)  # the OpenAI default for completions
    echo: bool = False


def _message_text(m: ChatMessage) -> dict:
    content = m.content
    if isinstance(content, list):
        parts = []
        for p in content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ApiError(400, f"message content part of type {p.get('type')!r} is not supported "
                                    "(text only)", "messages")
            parts.append(p["text"])
        content = "".join(parts)
    role = "system" if m.role == "developer" else m.role
    return {"role": role, "content": content or ""}


def create_app(client, model_name: str | None = None) -> FastAPI:
    from stip.client.sampling import SamplingParams

    model_name = model_name or f"stip-{client.bundle.config.get('model_type', 'model')}"
    app = FastAPI(title="STIP OpenAI-compatible proxy")

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error(e.status, e.message, e.param, e.kind)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON")
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        return _error(400, f"{'.'.join(loc) or 'request'}: {first.get('msg', 'invalid request')}",
                      loc[0] if loc else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), kind="invalid_request_error" if e.status_code < 500
                      else "server_error")

    def params_of(req: _Common, max_tokens: int | None) -> SamplingParams:
        if req.n != 1:
            raise ApiError(400, "n must be 1: this proxy returns one choice per request", "n")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise ApiError(400, "at most 4 stop sequences", "stop")
        try:
            return SamplingParams(max_tokens=max_tokens or 256, temperature=req.temperature, top_p=req.top_p,
                                  top_k=req.top_k, repetition_penalty=req.repetition_penalty, seed=req.seed,
                                  stop=stop)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def check_length(ids: list[int], param: str) -> None:
        if client.max_positions and len(ids) > client.max_positions:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this model takes at most "
                                f"{client.max_positions}", param, "context_length_exceeded")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "stip"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "bundle_id": client.bundle.bundle_id}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        params = params_of(req, req.max_completion_tokens or req.max_tokens)
        messages = [_message_text(m) for m in req.messages]
        try:
            ids = client.encode(messages=messages)
        except Exception as e:  # a template that rejects the roles, say
            raise ApiError(400, f"could not apply the chat template: {e}", "messages") from None
        check_length(ids, "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "created": created, "model": req.model or model_name}
        if req.stream:
            def chunk(delta: dict, finish=None) -> dict:
                return {**base, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

            return _sse(client, ids, params, request, first=chunk({"role": "assistant", "content": ""}),
                        piece=lambda text: chunk({"content": text}), last=lambda g: chunk({}, g.finish_reason),
                        usage=bool((req.stream_options or {}).get("include_usage")),
                        usage_chunk=lambda g: {**base, "object": "chat.completion.chunk", "choices": [],
                                               "usage": g.usage})
        g = await _generate(client, ids, params, request)
        return {**base, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text},
                             "finish_reason": g.finish_reason, "logprobs": None}],
                "usage": g.usage}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        params = params_of(req, req.max_tokens)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request (a list of prompts is a batch)", "prompt")
            prompt = prompt[0]
        try:
            ids = client.encode(ids=prompt) if isinstance(prompt, list) else client.encode(prompt=prompt)
        except ValueError as e:
            raise ApiError(400, str(e), "prompt") from None
        if isinstance(prompt, list) and (min(ids) < 0 or max(ids) >= client.bundle.vocab_size):
            raise ApiError(400, f"token ids must be in [0, {client.bundle.vocab_size})", "prompt")
        check_length(ids, "prompt")
        echo = (prompt if isinstance(prompt, str) else client.tokenizer.decode(ids)) if req.echo else ""
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": req.model or model_name}
        if req.stream:
            def chunk(text: str, finish=None) -> dict:
                return {**base, "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

            return _sse(client, ids, params, request, first=chunk(echo) if echo else None, piece=chunk,
                        last=lambda g: chunk("", g.finish_reason),
                        usage=bool((req.stream_options or {}).get("include_usage")),
                        usage_chunk=lambda g: {**base, "choices": [], "usage": g.usage})
        g = await _generate(client, ids, params, request)
        return {**base, "choices": [{"index": 0, "text": echo + g.text, "finish_reason": g.finish_reason,
                                     "logprobs": None}], "usage": g.usage}

    return app


class _Worker:
    """Runs one blocking generation in its own thread and hands deltas to the event loop through a queue. The thread
    starts when `deltas()` is first consumed: a streaming response whose client left before its body started never
    opens a server session."""

    _END = object()

    def __init__(self, client, ids, params):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.generation = None
        self.error: BaseException | None = None
        self.stream = client.stream(ids=ids, params=params)  # bad parameters raise here, before any output


    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _run(self) -> None:
        it = iter(self.stream)
        try:
            for delta in it:
                if self.cancelled.is_set():
                    it.close()  # ends the server session
                    break
                self._put(delta)
            self.generation = self.stream.generation
        except BaseException as e:  # reported to the HTTP client
            self.error = e
        finally:
            self._put(self._END)

    async def deltas(self):
        """Start the generation (only once someone consumes it) and yield its text deltas."""
        threading.Thread(target=self._run, daemon=True).start()
        while True:
            item = await self.queue.get()
            if item is self._END:
                if self.error is not None:
                    raise self.error
                return
            yield item


def _upstream(e: BaseException) -> ApiError:
    """A STIP failure as the OpenAI client should see it: the server's session limit is a retryable 429, an auth
    failure is the proxy's misconfiguration (502), any other refusal is the request's fault (400)."""
    status = getattr(e, "status", None)
    if isinstance(e, StipError) and status == 429:
        return ApiError(429, f"the STIP server is at its session limit, retry later: {e}", kind="rate_limit_error")
    if isinstance(e, StipError) and isinstance(status, int) and 400 <= status < 500 and status not in (401, 403):
        return ApiError(400, f"the STIP server refused the request: {e}")
    if isinstance(e, (StipError, OSError)):
        return ApiError(502, f"STIP server error: {e}", kind="server_error")
    return ApiError(500, f"internal error: {e}", kind="server_error")


async def _cancel_on_disconnect(request: Request, w: "_Worker") -> None:
    """Stop the generation (and so its server session) when the HTTP client goes away mid-request."""
    while not w.cancelled.is_set():
        if await request.is_disconnected():
            w.cancelled.set()
            return
        await asyncio.sleep(0.25)


async def _generate(client, ids, params, request: Request):
    w = _Worker(client, ids, params)
    watch = asyncio.create_task(_cancel_on_disconnect(request, w))
    try:
        async for _ in w.deltas():
            pass
    except Exception as e:
        raise _upstream(e) from None
    finally:
        w.cancelled.set()
        watch.cancel()
    return w.generation


def _sse(client, ids, params, request: Request, *, first, piece, last, usage: bool, usage_chunk):
    def line(obj) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"

    w = _Worker(client, ids, params)

    async def body():
        try:
            if first is not None:
                yield line(first)
            async for delta in w.deltas():
                yield line(piece(delta))
            yield line(last(w.generation))
            if usage:
                yield line(usage_chunk(w.generation))
        except Exception as e:  # headers are out: report in-band, as OpenAI does
            err = _upstream(e)
            yield line({"error": {"message": err.message, "type": err.kind, "param": None, "code": None}})
        finally:
            w.cancelled.set()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def run_proxy(bundle: Path, *, server: str, host: str = "127.0.0.1", port: int = 8080, token: str | None = None,
              downlink: str = "topk", model_name: str | None = None, trusted=None) -> None:
    import uvicorn

    from stip.client.sdk import Client

    client = Client(bundle, server, token=token, downlink=downlink, trusted=trusted)
    app = create_app(client, model_name)
    print(f"STIP proxy: OpenAI-compatible API on http://{host}:{port}/v1 -> STIP server {server} "
          f"(bundle {client.bundle.bundle_id})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
