"""Server-sent events for the proxy's streaming responses: the 200 goes out only once every choice's server session
is open and its first output is back; after that, an upstream failure can only be reported in-band, as OpenAI does.
Chunks of n > 1 choices interleave as they arrive, each with its `index`."""

from __future__ import annotations

import asyncio
import json

from fastapi import Request
from fastapi.responses import StreamingResponse

from stip.client.proxy_generation import Generations, cancel_on_disconnect, upstream_error
from stip.client.proxy_responses import reported


def _line(obj) -> str:
    """One event; a list of chunks is several; None (a format holding text back) is none."""
    if obj is None or isinstance(obj, list):
        return "".join(_line(x) for x in obj or ())
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def open_streams(gens, request: Request) -> None:
    """Open every choice before the 200 goes out, so that an upstream refusal is the HTTP status; a client that
    hangs up meanwhile cancels them."""
    watch = asyncio.create_task(cancel_on_disconnect(request, gens))
    try:
        await gens.opened()
    except Exception as e:
        gens.stop()
        raise upstream_error(e) from None
    finally:
        watch.cancel()


async def sse_response(gens: Generations, fmt, request: Request, eos: set[int], include_usage: bool
                       ) -> StreamingResponse:
    """Open every choice (raising the upstream error as an HTTP error), then stream `fmt`'s chunks."""
    await open_streams(gens, request)
    sent = [0] * gens.n  # per choice: logprobs already streamed

    async def body():
        try:
            for i in range(gens.n):
                first = fmt.first(i)
                if first is not None:
                    yield _line(first)
            async for i, delta in gens.events():
                if delta is None:  # choice i has ended
                    g = gens.results[i]
                    if g is not None:
                        yield _line(fmt.last(i, g.finish_reason, reported((g.logprobs or [])[sent[i]:], eos)))
                    continue
                lps = getattr(delta, "logprobs", None) or []
                sent[i] += len(lps)
                line = _line(fmt.piece(i, str(delta), reported(lps, eos)))
                if line:
                    yield line
            if include_usage and all(g is not None for g in gens.results):
                yield _line(fmt.usage_chunk(gens.results))
        except Exception as e:  # headers are out: report in-band, as OpenAI does
            yield _line(upstream_error(e).body())
        finally:
            gens.stop()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
