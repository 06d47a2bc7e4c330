"""Who may talk to `stip proxy`: it handles plaintext prompts and answers, so

- without an API key it binds loopback only, and answers only requests whose Host header names loopback (localhost,
  127.0.0.1, [::1]) at the port it listens on. A web page whose DNS name an attacker re-points at 127.0.0.1 (DNS
  rebinding) reaches the port with the browser's same-origin blessing, but its requests carry the attacker's name
  as Host, and are refused. `--allowed-host NAME` adds a name the operator points at this machine himself.
- with a key, every /v1 request must carry it; off loopback the key and every prompt cross the network, so TLS
  (`--ssl-certfile`/`--ssl-keyfile`, served by uvicorn) is required.

Starlette's TrustedHostMiddleware is not used: it splits "[::1]:8080" at the first colon, ignores the port, and
answers in plain text rather than the OpenAI error body clients parse.
"""

from __future__ import annotations

import hmac
import re
import ssl
from pathlib import Path

from fastapi.responses import JSONResponse

from stip.client.proxy_requests import ApiError
from stip.common.hosts import is_loopback_host
from stip.errors import StipError

API_KEY_ENV = "STIP_PROXY_API_KEY"
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::([0-9]{1,5}))?")  # a Host header: name or [v6], port


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), e.status, headers=e.headers)


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


class BearerAuth:
    """ASGI middleware: requests under /v1 need `Authorization: Bearer KEY` (compared in constant time), else 401."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            given = _header(scope, b"authorization") or b""
            if not hmac.compare_digest(given, self.expected):
                why = "no API key given" if not given else "incorrect API key"
                err = ApiError(401, f"{why}: send the proxy's key as `Authorization: Bearer KEY` (the OpenAI "
                                    f"client's api_key)", None, "invalid_api_key", kind="invalid_request_error",
                               headers={"WWW-Authenticate": "Bearer"})
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class HostCheck:
    """ASGI middleware for the key-less proxy: every request's Host must name loopback (or one of `allowed_hosts`)
    at the port the request arrived on, else 400 (against DNS rebinding)."""

    def __init__(self, app, allowed_hosts=()):
        self.app = app
        self.allowed = {h.lower() for h in allowed_hosts}

    def accepts(self, host: str, scope) -> bool:
        m = _HOST.fullmatch(host)
        if m is None:
            return False
        name, port = m.group(1).lower(), m.group(2)
        if not (is_loopback_host(name) or name in self.allowed):
            return False
        server = scope.get("server")
        if not server or server[1] is None:  # not a TCP listener (a unix socket): the name is what counts
            return True
        default = 443 if scope.get("scheme") in ("https", "wss") else 80
        return (int(port) if port else default) == server[1]

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = (_header(scope, b"host") or b"").decode("latin-1")
            if not self.accepts(host, scope):
                port = (scope.get("server") or (None, "PORT"))[1]
                names = ", ".join(["localhost", "127.0.0.1", "[::1]", *sorted(self.allowed)])
                err = ApiError(400, f"Host {host[:100]!r} is not this proxy: without an API key it answers only "
                                    f"requests for {names} at port {port} (a web page whose DNS name was pointed at "
                                    f"this machine, DNS rebinding, sends its own name). A name of yours for this "
                                    f"machine: --allowed-host NAME", None, "host_not_allowed",
                               kind="invalid_request_error")
                if scope["type"] == "http":
                    await error_response(err)(scope, receive, send)
                else:
                    await send({"type": "websocket.close", "code": 1008, "reason": "Host not allowed"})
                return
        await self.app(scope, receive, send)


def check_cors(origins, api_key: str | None) -> None:
    """CORS origins are web origins (scheme://host[:port]); "*" (any web page may read the answers) needs a key."""
    for origin in origins:
        if origin == "*":
            if not api_key:
                raise StipError("--cors-origin '*' lets every web page the user opens call this proxy and read its "
                                "answers: it needs --api-key (or STIP_PROXY_API_KEY); or name the origins you trust")
        elif not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?",
                              origin):
            raise StipError(f"--cors-origin {origin!r}: give a web origin, scheme://host[:port] with no path "
                            f"(e.g. http://localhost:3000)")


def check_listen(host: str, api_key: str | None, ssl_certfile=None, ssl_keyfile=None, allowed_hosts=()) -> None:
    """Refuse, before anything else starts, a listener that would expose plaintext: off loopback without a key, or
    with a key but without TLS; and TLS files that cannot serve."""
    if not api_key and not is_loopback_host(host):
        raise StipError(f"refusing to listen on {host}: the proxy handles plaintext prompts and answers, so it "
                        f"binds to loopback only unless it has an API key of its own (--api-key or {API_KEY_ENV}); "
                        f"clients then send it as their OpenAI api_key")
    if api_key and allowed_hosts:
        raise StipError("--allowed-host applies to the proxy without an API key (which checks the Host header); "
                        "with a key, every request is checked by its key instead")
    for name in allowed_hosts:
        if not re.fullmatch(r"[A-Za-z0-9.-]+", name):
            raise StipError(f"--allowed-host {name!r}: give a host name (letters, digits, dots, dashes), no port")
    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise StipError("--ssl-certfile and --ssl-keyfile go together: the certificate and its private key")
    if ssl_certfile:
        for path in (ssl_certfile, ssl_keyfile):
            if not Path(path).is_file():
                raise StipError(f"TLS file {path} does not exist or is not a file")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(ssl_certfile, ssl_keyfile)
        except (ssl.SSLError, OSError) as e:
            raise StipError(f"cannot serve TLS with {ssl_certfile} and {ssl_keyfile}: {e}") from None
    elif api_key and not is_loopback_host(host):
        raise StipError(f"refusing to listen on {host} without TLS: the API key and every prompt and answer would "
                        f"cross the network in clear text. Pass --ssl-certfile and --ssl-keyfile (the proxy then "
                        f"serves https), or bind to 127.0.0.1 behind a TLS-terminating proxy on this machine")
