"""A minimal OpenAI Responses API for `stip proxy`: `POST /v1/responses`, text in and text out, whole or streamed.

`input` is a string (one user message) or a list of message items (roles user, system, developer, assistant; content a
string or input_text/output_text parts); `instructions` go first as the system message. The conversation goes
through the bundle's chat template, as chat completions do, and one generation answers it. Nothing is stored
(`previous_response_id` is refused), there are no tools, reasoning or structured output. Streamed, the events are
the Responses API's: response.created, response.in_progress, response.output_item.added, response.content_part.added,
response.output_text.delta..., response.output_text.done, response.content_part.done, response.output_item.done, then
response.completed (or response.incomplete when max_output_tokens cut the answer).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Optional, Union

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import Field, field_validator

from stip.client.proxy_generation import upstream_error
from stip.client.proxy_sse import open_streams
from stip.client.proxy_requests import ApiError, _Strict
from stip.common.sampling import SamplingParams

ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
TEXT_PARTS = ("input_text", "output_text", "text")


class StreamOptions(_Strict):
    include_obfuscation: bool = False  # accepted; there is nothing to obfuscate on loopback


class ResponsesRequest(_Strict):
    model: str = "stip"
    input: Union[str, list[dict[str, Any]]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    text: Optional[dict[str, Any]] = None  # only {"format": {"type": "text"}}
    store: Optional[bool] = None  # accepted: the proxy stores nothing either way
    metadata: Optional[dict[str, str]] = None  # accepted, echoed, not used
    user: Optional[str] = None  # accepted, not used
    parallel_tool_calls: Optional[bool] = None  # accepted: there are no tools to call

    @field_validator("text")
    @classmethod
    def _plain_text(cls, text):
        if text and (set(text) - {"format"} or (text.get("format") or {"type": "text"}) != {"type": "text"}):
            raise ValueError("only plain text output is supported ({'format': {'type': 'text'}}): structured output "
                             "(JSON mode, JSON schema) and verbosity are not")
        return text

    def messages(self) -> list[dict]:
        """The conversation as the chat template takes it: instructions first (as the system message), then input."""
        out = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return out + [{"role": "user", "content": self.input}]
        for i, item in enumerate(self.input):
            out.append(_message(item, f"input[{i}]"))
        if not out:
            raise ApiError(400, "input is empty", "input", "invalid_value")
        return out

    def sampling(self, max_tokens: int) -> SamplingParams:
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=1.0 if self.temperature is None else
                                  self.temperature, top_p=1.0 if self.top_p is None else self.top_p)
        except ValueError as e:
            raise ApiError(400, str(e), None, "invalid_value") from None


def _message(item: dict, where: str) -> dict:
    """One input item (a message) as {"role", "content"}; other item types (tool calls, images, files) get a 400."""
    kind = item.get("type", "message")
    if kind != "message":
        raise ApiError(400, f"{where}: input items of type {kind!r} are not supported (messages only: text in, text "
                            f"out)", "input", "unsupported_value")
    role = item.get("role")
    if role not in ROLES:
        raise ApiError(400, f"{where}: role {role!r} is not supported (user, system, developer, assistant)", "input",
                       "unsupported_value")
    content = item.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            text = part.get("text") if isinstance(part, dict) else None
            if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS or not isinstance(text, str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(400, f"{where}.content[{j}]: content of type {kind!r} is not supported (input_text and "
                                    f"output_text only)", "input", "unsupported_value")
            texts.append(text)
        content = "".join(texts)
    if not isinstance(content, str):
        raise ApiError(400, f"{where}: content must be a string or a list of text parts", "input", "invalid_value")
    return {"role": ROLES[role], "content": content}


class ResponseBody:
    """The `response` object and its message item, as it stands (in progress, completed, incomplete, failed)."""

    def __init__(self, req: ResponsesRequest, model: str):
        self.req, self.model = req, model
        self.id, self.item_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())

    def item(self, text: str | None, status: str) -> dict:
        content = [] if text is None else [self.part(text)]
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant", "content": content}

    @staticmethod
    def part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def response(self, status: str = "in_progress", gen=None, error: dict | None = None) -> dict:
        """`gen`: the finished Generation (its text, finish_reason and usage), or None while in progress."""
        req = self.req
        incomplete = gen is not None and gen.finish_reason == "length"
        if gen is not None:
            status = "incomplete" if incomplete else "completed"
        out = {"id": self.id, "object": "response", "created_at": self.created, "status": status, "error": error,
               "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
               "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
               "model": req.model or self.model, "output": [], "parallel_tool_calls": False,
               "previous_response_id": None, "store": False, "temperature": req.temperature, "top_p": req.top_p,
               "text": {"format": {"type": "text"}}, "tool_choice": "none", "tools": [], "truncation": "disabled",
               "usage": None, "user": req.user, "metadata": req.metadata or {}}
        if gen is not None:
            out["output"] = [self.item(gen.text, status)]
            u = gen.usage
            out["usage"] = {"input_tokens": u["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
                            "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                            "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}
        return out


def _event(kind: str, seq: int, **fields) -> str:
    data = json.dumps({"type": kind, "sequence_number": seq, **fields}, separators=(",", ":"), ensure_ascii=False)
    return f"event: {kind}\ndata: {data}\n\n"


async def _stream(gens, body: ResponseBody, request: Request) -> StreamingResponse:
    """Open the generation (an upstream refusal is the HTTP status), then stream the Responses API's events."""
    await open_streams(gens, request)
    where = {"item_id": body.item_id, "output_index": 0, "content_index": 0}

    async def events():
        seq = iter(range(1 << 62))
        yield _event("response.created", next(seq), response=body.response())
        yield _event("response.in_progress", next(seq), response=body.response())
        yield _event("response.output_item.added", next(seq), output_index=0, item=body.item(None, "in_progress"))
        yield _event("response.content_part.added", next(seq), **where, part=body.part(""))
        try:
            async for _, delta in gens.events():
                if delta:
                    yield _event("response.output_text.delta", next(seq), **where, delta=str(delta), logprobs=[])
        except Exception as e:  # headers are out: report in-band
            error = upstream_error(e)
            yield _event("error", next(seq), code=error.code, message=error.message, param=error.param)
            yield _event("response.failed", next(seq), response=body.response(
                "failed", error={"code": error.code or "server_error", "message": error.message}))
            return
        finally:
            gens.stop()
        gen = gens.results[0]
        if gen is None:  # the HTTP client has gone
            return
        done = body.response(gen=gen)
        yield _event("response.output_text.done", next(seq), **where, text=gen.text, logprobs=[])
        yield _event("response.content_part.done", next(seq), **where, part=body.part(gen.text))
        yield _event("response.output_item.done", next(seq), output_index=0, item=done["output"][0])
        yield _event(f"response.{done['status']}", next(seq), response=done)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def responses_router(endpoints) -> APIRouter:
    """`/responses`, to include under the proxy's /v1 router; `endpoints`: the proxy's `TextEndpoints`."""
    router = APIRouter()

    @router.post("/responses")
    async def responses(req: ResponsesRequest, request: Request):
        endpoints.check_generates()
        ids, features = await endpoints.chat_ids(req.messages(), "input")
        params = req.sampling(endpoints.fit(ids, req.max_output_tokens, "input", "input"))
        gens = endpoints.generations(ids, [params], features)
        body = ResponseBody(req, endpoints.model_name)
        if req.stream:
            return await _stream(gens, body, request)
        return body.response(gen=(await gens.run(request))[0])

    return router
