"""The proxy's generation workers: the choices of one request (n per prompt, for every prompt of a batch), each a
blocking SDK generation (its own server session) run by a pool of at most MAX_CONCURRENT threads, feeding one asyncio
queue on the event loop. The SDK is safe for that: each generation has its own session (WebSocket), sampler, noise
and detokenizer; what they share (the bundle's weights and key, the tokenizer's decode) is only read.

`opened()` waits until every choice of the first wave has its session open, its prompt prefilled and its first output
back (or one failed), so a streaming response sends its 200 only after that and an upstream refusal (the server's
session limit: 429) reaches the HTTP client as a status the `openai` SDK retries, not as an error inside a 200 stream.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import AsyncIterator

from fastapi import Request

from stip.client.proxy_requests import ApiError
from stip.errors import StipError, TeeError

log = logging.getLogger("stip.proxy")
_END = object()
RETRY_AFTER_S = 1  # what a 429 or 503 tells the client to wait
MAX_CONCURRENT = 16  # server sessions one request holds at once (n's maximum; a key's default server quota is 16)


def upstream_error(e: BaseException) -> ApiError:
    """A STIP failure as the OpenAI client should see it, and in the proxy's log when it is not the request's
    fault (5xx): the server's session limit is a retryable 429 and its "busy" a retryable 503; an enclave that
    fails the client's checks (attestation, channel) and an auth failure are the proxy's setup (502); any other
    refusal is the request's fault (400)."""
    error = _upstream_error(e)
    if error.status >= 500:
        log.warning("answered %d: %s", error.status, error.message, exc_info=error.status == 500 and e)
    return error


def _upstream_error(e: BaseException) -> ApiError:
    status = getattr(e, "status", None)
    retry = {"Retry-After": str(RETRY_AFTER_S)}
    if isinstance(e, StipError) and status == 429:
        return ApiError(429, f"the STIP server is at its session limit, retry later: {e}", None,
                        "rate_limit_exceeded", kind="rate_limit_error", headers=retry)
    if isinstance(e, TeeError):
        # the message names the failed check
        return ApiError(502, f"TEE enclave refused: {e}", None, "enclave_refused", kind="server_error")
    if isinstance(e, StipError) and status == 503:
        return ApiError(503, f"the STIP server is busy, retry later: {e}", None, "server_busy", kind="server_error",
                        headers=retry)
    if isinstance(e, StipError) and isinstance(status, int) and 400 <= status < 500 and status not in (401, 403):
        return ApiError(400, f"the STIP server refused the request: {e}", None, "upstream_refused")
    if isinstance(e, (StipError, OSError)):
        return ApiError(502, f"STIP server error: {e}", None, "upstream_error", kind="server_error")
    return ApiError(500, f"internal error: {e}", kind="server_error")


class Generations:
    """The choices of one request: choice i generates from `prompts[i]` (token ids; one list for all choices, or
    one per choice) with `params[i]`. Events are (index, text delta) and, once choice `index` has ended,
    (index, None) with its `Generation` in `results[index]`; a choice's failure raises from `opened()`/`events()`
    and stops the others. At most `concurrent` choices run at once, in index order."""

    def __init__(self, client, prompts: list, params: list, image_features=None, concurrent: int = MAX_CONCURRENT):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        extra = {} if image_features is None else {"image_features": image_features}  # LLaVA: one vision pass
        if prompts and isinstance(prompts[0], int):  # one prompt, shared by every choice
            prompts = [prompts] * len(params)
        # not started yet (generators): bad parameters raise here, before any session opens
        self.streams = [client.stream(ids=ids, params=p, **extra) for ids, p in zip(prompts, params, strict=True)]
        self.results: list = [None] * len(params)
        self.workers = max(1, min(concurrent, len(params)))
        self._next_choice = iter(range(len(params)))
        self._take = threading.Lock()
        self._buffer: list[tuple[int, object]] = []
        self._started = False

    @property
    def n(self) -> int:
        return len(self.streams)

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _work(self) -> None:
        """A pool thread: the next choice not yet taken, until none is left or the request is cancelled."""
        while not self.cancelled.is_set():
            with self._take:
                i = next(self._next_choice, None)
            if i is None:
                return
            self._run(i)

    def _run(self, i: int) -> None:
        stream = self.streams[i]
        it = iter(stream)
        try:
            for delta in it:
                if self.cancelled.is_set():
                    it.close()  # ends the server session
                    break
                self._put((i, delta))
            self.results[i] = stream.generation
            self._put((i, _END))
        except BaseException as e:  # reported to the HTTP client
            self._put((i, e))

    def _start(self) -> None:
        if not self._started:
            self._started = True
            for w in range(self.workers):
                threading.Thread(target=self._work, daemon=True, name=f"stip-proxy-choice-{w}").start()

    async def _next(self) -> tuple[int, object]:
        i, x = await self.queue.get()
        if isinstance(x, BaseException):
            self.cancelled.set()
            raise x
        return i, x

    async def opened(self) -> None:
        """Start the choices; return once each of the first wave (those the pool starts at once) has produced its
        first output (so its session is open and its prompt prefilled) or raise the first failure."""
        self._start()
        pending = set(range(self.workers))
        while pending:
            i, x = await self._next()
            self._buffer.append((i, x))
            pending.discard(i)

    async def events(self) -> AsyncIterator[tuple[int, str | None]]:
        self._start()
        live = self.n
        while live:
            i, x = self._buffer.pop(0) if self._buffer else await self._next()
            if x is _END:
                live -= 1
                yield i, None
            else:
                yield i, x

    async def run(self, request: Request) -> list:
        """Every choice to its end (stopped if the HTTP client leaves); the Generations, in choice order."""
        watch = asyncio.create_task(cancel_on_disconnect(request, self))
        try:
            async for _ in self.events():
                pass
        except Exception as e:
            raise upstream_error(e) from None
        finally:
            self.cancelled.set()
            watch.cancel()
        if any(g is None for g in self.results):  # stopped: the HTTP client has gone
            raise ApiError(499, "the client closed the request")
        return self.results

    def stop(self) -> None:
        self.cancelled.set()


async def cancel_on_disconnect(request: Request, gens: Generations) -> None:
    """Stop the generations (and so their server sessions) when the HTTP client goes away mid-request."""
    while not gens.cancelled.is_set():
        if await request.is_disconnected():
            gens.cancelled.set()
            return
        await asyncio.sleep(0.25)
