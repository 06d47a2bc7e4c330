"""The server's plain HTTP routes: /health for anyone; /v1/info, /v1/contexts and /metrics behind a key."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response

from stip.server.auth import AuthError, Principal
from stip.server.contexts import ContextError, Contexts
from stip.server.refusals import no_context, refused


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
            who = caller(request)
        except AuthError as e:
            return refused(e.status, str(e))
        return contexts.listing(who)

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
