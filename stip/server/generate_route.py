"""POST /v1/generate: server-decode generations (`stip.common.generate`) on any `TokenEngine`, under the sessions'
auth, quotas and KV admission.

Reservation: a generation takes one of its client's session slots and `min(prompt + max_tokens, max_seq_len)` KV
tokens before anything runs, and the engine is asked for no more new tokens than that reservation holds (max_tokens
cut to it; the generation then ends with finish_reason "length"), so no generation holds more KV than it reserved,
whatever the engine and whatever the model's own position limit. A max_tokens over max_seq_len is refused (422).

Release: the slot and the tokens go back exactly once however the response ends: the stream finished or failed, the
client left mid-stream, or left before the body began (the body generator may then never start, so its `finally`
alone is not enough: the response's own does it too). Clean-up never awaits inside a cancelled scope.

Rekey budget: a generation counts its prompt and generated tokens against its context's key (`stip.server.key_usage`);
a context past its budget takes no new generation (403), while running ones finish.

Revocation: a running generation is registered under its client; when that client's key is revoked
(`StipService.drop_revoked`, within `auth.REVOCATION_BOUND` of the key file's change) its stream ends at once with a
last line {"error": ..., "status": 403}, and its sequence is freed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from stip.common import wire
from stip.common.generate import GENERATE_PATH, GenerateRequest
from stip.common.tasks import ONE_SHOT_TASKS
from stip.server.auth import AuthError
from stip.server.budget import AdmissionError
from stip.server.contexts import ContextError
from stip.server.encode_route import ENCODE_PATH
from stip.server.engine import TokenEngine
from stip.server.generations import Generation
from stip.server.refusals import admission_refused, no_context, refused

log = logging.getLogger("stip.server")

REVOKED = "this API key was revoked: its generation was stopped"


_BACKGROUND: set[asyncio.Task] = set()  # clean-up tasks, referenced until done


def _close_later(agen) -> None:
    """Close an async generator in a task of its own: the caller may be in a cancelled scope (the client left),
    where any await would be interrupted before the generator's `finally` (which frees the sequence) ran."""
    task = asyncio.ensure_future(agen.aclose())
    _BACKGROUND.add(task)

    def done(t: asyncio.Task) -> None:
        _BACKGROUND.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("closing a generation failed: %r", t.exception())
    task.add_done_callback(done)


def _error_line(status: int, message: str) -> str:
    return json.dumps({"error": message, "status": status}) + "\n"


async def _lines(chunks: AsyncIterator, gen: Generation, count: Callable[[int], None],
                 release: Callable[[], None]) -> AsyncIterator[str]:
    """NDJSON lines of `chunks`; an error after the stream started (engine failure, revoked key) is its last line.
    Each chunk is awaited beside `gen.cut`, so a revocation ends the stream even while a step is computing."""
    cut = asyncio.ensure_future(gen.cut.wait())
    step: asyncio.Future | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(chunks))
            await asyncio.wait((step, cut), return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()  # the engine's generator stops at its await and frees its sequence
                await asyncio.wait((step,))
                yield _error_line(403, REVOKED)
                return
            try:
                chunk = step.result()
            except StopAsyncIteration:
                return
            count(len(chunk.ids))
            yield chunk.model_dump_json(exclude_none=True) + "\n"
    except Exception as e:  # noqa: BLE001 - the stream has started: report on it, keep serving others
        log.exception("engine failure in a generation")
        yield _error_line(500, f"internal error in the model ({type(e).__name__})")
    finally:
        cut.cancel()
        if step is not None and not step.done():
            step.cancel()
        else:
            _close_later(chunks)
        release()


class _GenerationResponse(StreamingResponse):
    """The NDJSON stream of one generation; `release` runs when the response ends, whichever way."""

    def __init__(self, lines: AsyncIterator[str], release: Callable[[], None]):
        super().__init__(lines, media_type="application/x-ndjson")
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            _close_later(self.body_iterator)  # suspended at a line the client never took: run its `finally`
            self._release()


def _validation_message(e: ValidationError) -> tuple[int, str]:
    """(status, message) for a request body pydantic refused: malformed JSON 400, a bad field 422."""
    errors = e.errors(include_url=False, include_input=False)
    if any(err.get("type") == "json_invalid" for err in errors):
        return 400, f"malformed JSON body: {errors[0].get('msg')}"
    where = lambda err: ".".join(map(str, err.get("loc") or ())) or "body"  # noqa: E731
    return 422, "; ".join(f"{where(err)}: {err.get('msg')}" for err in errors[:5])


def _no_prompt_logprobs(engine: TokenEngine, n: int, max_all_logits: int) -> tuple[int, str] | None:
    """Why a request for prompt_logprobs is refused here ((status, message)), or None: the engine must score every
    position (our own engine does; vLLM's is not wired yet), and T x V logits must fit the server's limit."""
    if not getattr(engine, "prompt_logprobs", False):
        return 400, "prompt_logprobs is served by the transformers engine only (stip serve --engine transformers)"
    if n * engine.vocab_size > max_all_logits:
        return 413, (f"prompt_logprobs over {n} tokens needs {n * engine.vocab_size} logits, over this server's "
                     f"max_all_logits of {max_all_logits} (at most {max_all_logits // engine.vocab_size} tokens)")
    return None


def add_generate_route(app: FastAPI, contexts) -> None:
    """POST /v1/generate on the context the request names (see the module docstring)."""
    @app.post(GENERATE_PATH)
    async def generate(request: Request):
        service = contexts.first  # auth and metrics are shared by all contexts
        try:
            who = service.auth.authenticate(request.headers.get("authorization"))
            service = contexts.pick(request.headers)
        except AuthError as e:
            service.metrics.errors.labels(str(e.status)).inc()
            return refused(e.status, str(e))
        except ContextError as e:
            service.metrics.errors.labels(str(e.status)).inc()
            return no_context(e)

        def bad(status: int, message: str) -> JSONResponse:
            service.metrics.errors.labels(str(status)).inc()
            return JSONResponse({"ok": False, "status": status, "error": message}, status_code=status)

        engine = service.engine
        if service.task in ONE_SHOT_TASKS:
            return bad(400, f"this server serves a {service.task} model: it takes one-shot requests at POST "
                            f"{ENCODE_PATH}, not {GENERATE_PATH}")
        if not isinstance(engine, TokenEngine):
            return bad(400, f"this server runs a round-trip bundle: it takes embedding sessions at "
                            f"{wire.SESSION_PATH}, not token ids; protect the model with `stip protect --mode "
                            f"server-decode` to serve {GENERATE_PATH}")
        body = await request.body()
        if len(body) > service.max_message_bytes:
            return bad(413, f"request body of {len(body)} bytes exceeds the server's limit of "
                            f"{service.max_message_bytes} bytes")
        try:
            req = GenerateRequest.model_validate_json(body)
        except ValidationError as e:
            return bad(*_validation_message(e))
        v = engine.vocab_size
        for name, ids in (("ids", req.ids), ("stop_ids", req.stop_ids)):
            wrong = next((i for i in ids if not 0 <= i < v), None)
            if wrong is not None:
                return bad(422, f"{name}: token id {wrong} is out of range [0, {v})")
        limit = service.max_seq_len
        if len(req.ids) >= limit:
            return bad(413, f"the prompt has {len(req.ids)} tokens; this server's max_seq_len is {limit}, which "
                            f"must leave room for at least one new token")
        if req.max_tokens > limit:
            return bad(422, f"max_tokens: {req.max_tokens} is over this server's max_seq_len of {limit} (prompt and "
                            f"output together; a generation stops with finish_reason 'length' there)")
        if req.prompt_logprobs is not None:
            why = _no_prompt_logprobs(engine, len(req.ids), service.settings.max_all_logits)
            if why:
                return bad(*why)
        tokens = min(len(req.ids) + req.max_tokens, limit)
        try:
            service.admit_request(who, tokens)  # refused too on a context past its rekey budget (key_usage)
        except AdmissionError as e:
            return admission_refused(e)
        service.count_served(len(req.ids))  # the prompt's tokens; each generated one is counted as it comes
        # never more new tokens than the reservation holds (the last one is sampled, not cached)
        req = req.model_copy(update={"max_tokens": tokens - len(req.ids)})
        gen = Generation(who.name)
        service.generations.add(gen)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                service.generations.discard(gen)
                service.admission.close_session(who.name, tokens)

        chunks = engine.generate(req, request_id=os.urandom(8).hex(), client=who.name)  # client: vLLM's cache salt
        generated = service.metrics.tokens.labels("generate").inc

        def count(n: int) -> None:
            generated(n)
            service.count_served(n)
        return _GenerationResponse(_lines(chunks, gen, count, release), release)
