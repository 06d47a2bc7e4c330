"""Every error `stip proxy` answers is OpenAI's body, `{"error": {"message", "type", "param", "code"}}`: its own
refusals (`ApiError`), bodies that fail validation (a body not sent as JSON says so), and the router's 404 and 405,
which name the route asked for and list the routes served. A bare 404 reads as "model not found" to some clients
(langchain); this one says what is wrong.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from stip.client.proxy_guard import error_response
from stip.client.proxy_requests import ApiError, validation_error


def served_routes(app: FastAPI) -> list[str]:
    """"METHOD /path" of the API's routes (/v1 and /health; not FastAPI's documentation pages), from the app's
    OpenAPI schema (which FastAPI builds once)."""
    paths = app.openapi().get("paths", {})
    return [f"{method.upper()} {path}" for path, methods in paths.items()
            if path.startswith("/v1/") or path == "/health" for method in methods]


def route_error(app: FastAPI, request: Request, status: int, detail: str, headers: dict | None = None) -> ApiError:
    """The router's 404 (no such route) or 405 (not with this method), naming the request and the routes served;
    any other HTTP error as OpenAI's body."""
    asked = f"{request.method} {request.url.path[:200]}"
    served = ", ".join(served_routes(app))
    if status == 404:
        return ApiError(404, f"Invalid URL ({asked}): this STIP proxy serves {served}", None, "unknown_url")
    if status == 405:
        return ApiError(405, f"Method not allowed ({asked}): this STIP proxy serves {served}", None,
                        "method_not_allowed", headers=headers)
    return ApiError(status, detail, kind="invalid_request_error" if status < 500 else "server_error", headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Every error, the proxy's own and FastAPI's (validation, 404, 405), answers in OpenAI's error format."""

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return error_response(validation_error(e.errors(), request.headers.get("content-type")))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(route_error(app, request, e.status_code, str(e.detail), e.headers))
