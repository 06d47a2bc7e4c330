"""The JSON refusals every HTTP route of the server sends: a refused key or admission (a context past its rekey budget
included), and a request that names no context it serves. Its own module so that the routes never import `stip.server.app`, which wires them."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from stip.server.budget import AdmissionError
from stip.server.contexts import ContextError


def refused(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status in (401, 403) else {"Retry-After": "5"}
    return JSONResponse({"ok": False, "status": status, "error": message}, status_code=status, headers=headers)


def no_context(e: ContextError) -> JSONResponse:
    """A request naming no context on a several-context server (400), or a bundle it does not serve (404)."""
    return JSONResponse({"ok": False, "status": e.status, "error": str(e)}, status_code=e.status)


def admission_refused(e: AdmissionError) -> JSONResponse:
    """A refused admission: full or over quota with Retry-After; a context past its rekey budget (403) with neither
    Retry-After nor WWW-Authenticate, since no retry and no other key helps until the operator rekeys it."""
    if e.reason == "rekey_budget":
        return JSONResponse({"ok": False, "status": e.status, "error": str(e)}, status_code=e.status)
    return refused(e.status, str(e))
