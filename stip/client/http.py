"""The client's one HTTP stack: every HTTP request a client part makes (`Connection`, server-decode streams, the TEE
client's attestation) goes through `HttpClient`, so its rules hold everywhere and live here only:

- TLS: https verifies the certificate and host name against the system store, or only against a pinned CA file;
- redirects are never followed (one could carry the bearer token to another, or a plain http, host): a 3xx answer
  is an error naming where it pointed;
- no proxy or certificate settings are taken from the environment (`trust_env=False`);
- every answer is read up to a cap: a declared length over it is refused before reading, and a body is never read
  past it; streamed lines are capped too (a line without an end is not buffered without bound);
- one timeout per connect, read and write.

WebSocket sessions (`stip.client.session`) use the same SSLContext, from `tls_context`.
"""

from __future__ import annotations

import functools
import json
import os
import ssl
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from stip.client.errors import (StipConnectionError, StipProtocolError, StipServerError, cert_error, status_error,
                                tls_cause)
from stip.errors import StipError

HTTP_MAX_BYTES = 16 * 1024 * 1024  # /health, /v1/info and /metrics bodies, and any answer a caller does not size
ERROR_MAX_BYTES = 64 * 1024  # the body of an error answer: a JSON {"error": ...} message


def http_url(url: str, path: str) -> str:
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, "", ""))


def ws_url(url: str, path: str, query: dict | None = None) -> str:
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"server URL must start with http://, https://, ws:// or wss://, got {url!r}")
    base = parts.path.rstrip("/")
    return urllib.parse.urlunsplit((scheme, parts.netloc, base + path, urllib.parse.urlencode(query or {}), ""))


@functools.lru_cache(maxsize=1)
def system_tls() -> ssl.SSLContext:
    """The system trust store's verifying context, loaded once per process (loading it takes ~50 ms) and shared:
    nothing changes it after this."""
    return ssl.create_default_context()


def tls_context(url: str, ca_file: str | os.PathLike | None = None) -> ssl.SSLContext | None:
    """The SSLContext for https/wss URLs (None for plain http/ws): verifies the certificate and host name against
    the system trust store, or against `ca_file` only (CA pinning) when given."""
    scheme = urllib.parse.urlsplit(url if "://" in url else f"http://{url}").scheme
    secure = scheme in ("https", "wss")
    if ca_file is None:
        return system_tls() if secure else None
    if not secure:
        raise StipError(f"a CA file was given but {url} is not https:// or wss://: "
                        f"nothing would be verified; use an https:// URL")
    if not os.path.isfile(ca_file):
        raise StipError(f"CA file {ca_file} does not exist or is not a file")
    try:
        return ssl.create_default_context(cafile=os.fspath(ca_file))
    except (ssl.SSLError, OSError, ValueError) as e:
        raise StipError(f"cannot load the CA file {ca_file}: {e}") from None


@dataclass
class HttpReply:
    status: int
    body: bytes


_DEFAULT = object()


class HttpClient:
    """HTTP to one server (`base_url`; request paths are appended to it). `ssl`: the SSLContext to verify with
    (default: `tls_context(base_url, ca_file)`). `peer` names the server in errors ("the enclave"), `hint` follows
    a "cannot reach" error."""

    def __init__(self, base_url: str, *, timeout: float = 60.0, ssl=_DEFAULT, ca_file=None,
                 peer: str = "the STIP server", hint: str = " (is `stip serve` running there?)"):
        self.base_url, self.timeout, self.ca_file = base_url.rstrip("/"), timeout, ca_file
        self.peer, self.hint = peer, hint
        self.ssl = tls_context(base_url, ca_file) if ssl is _DEFAULT else ssl
        # plain http: no TLS is ever made (no redirect is followed), the shared context only spares httpx loading one
        self._client = httpx.Client(verify=self.ssl if self.ssl is not None else system_tls(), timeout=timeout,
                                    follow_redirects=False, trust_env=False,
                                    headers={"User-Agent": "stip-client", "Accept-Encoding": "identity"})

    def url(self, path: str) -> str:
        return http_url(self.base_url, path)

    # ------------------------------------------------------------ requests

    def fetch(self, method: str, path: str, *, headers: dict | None = None, content: bytes | None = None,
              json_body=None, limit: int = HTTP_MAX_BYTES) -> HttpReply:
        """One request; the answer's status and body (at most `limit` bytes, else StipProtocolError). A redirect
        is a StipServerError; any other status is returned, the caller decides (see `request`)."""
        r = self._open(method, path, headers, content, json_body)
        try:
            if r.status_code >= 400:
                return HttpReply(r.status_code, self._read(r, path, ERROR_MAX_BYTES, refuse_more=False))
            return HttpReply(r.status_code, self._read(r, path, limit))
        finally:
            r.close()

    def request(self, method: str, path: str, *, headers: dict | None = None, content: bytes | None = None,
                json_body=None, limit: int = HTTP_MAX_BYTES) -> bytes:
        """`fetch`, and any status but 2xx is an error carrying the server's message (401/403: StipAuthError)."""
        reply = self.fetch(method, path, headers=headers, content=content, json_body=json_body, limit=limit)
        if not 200 <= reply.status < 300:
            raise status_error(reply.status, path, error_detail(reply.body))
        return reply.body

    def open_stream(self, method: str, path: str, *, headers: dict | None = None,
                    content: bytes | None = None) -> httpx.Response:
        """A streamed answer with status 200 (else the error, as `request` raises it); read it with `iter_lines`,
        then `close()` it."""
        r = self._open(method, path, headers, content, None)
        if r.status_code != 200:
            try:
                body = self._read(r, path, ERROR_MAX_BYTES, refuse_more=False)
            finally:
                r.close()
            raise status_error(r.status_code, path, error_detail(body))
        return r

    def iter_lines(self, r: httpx.Response, path: str, max_line: int) -> Iterator[bytes]:
        """The lines of a streamed answer, each at most `max_line` bytes (else StipProtocolError, before more of
        the line is buffered); a dropped connection is a StipConnectionError."""
        pending = b""
        try:
            for chunk in r.iter_bytes():
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines + [pending]:
                    if len(line) > max_line:
                        raise StipProtocolError(f"{path} sent a line of more than {max_line} bytes")
                yield from lines
        except httpx.HTTPError as e:
            raise StipConnectionError(f"lost the connection to {self.base_url} mid-answer on {path}: {e}") from None
        if pending:
            yield pending

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------ internals

    def _open(self, method, path, headers, content, json_body) -> httpx.Response:
        """The answer, its body not read yet; errors translated, a redirect refused (and never followed)."""
        try:
            request = self._client.build_request(method, self.url(path), headers=headers, content=content,
                                                 json=json_body)
            r = self._client.send(request, stream=True)
        except httpx.HTTPError as e:
            raise self._connection_error(e) from None
        if r.is_redirect:
            r.close()
            where = r.headers.get("location", "")[:200]
            raise StipServerError(f"{self.peer} at {self.base_url} redirected {path} ({r.status_code}) to "
                                  f"{where!r}: redirects are not followed", r.status_code)
        return r

    def _read(self, r: httpx.Response, path: str, limit: int, refuse_more: bool = True) -> bytes:
        """At most `limit` bytes of the body: more is a StipProtocolError (`refuse_more`) or cut off."""
        declared = r.headers.get("content-length", "")
        if refuse_more and declared.isdigit() and int(declared) > limit:
            raise StipProtocolError(f"{self.base_url}{path} announced {int(declared)} bytes, more than the "
                                    f"{limit} this answer may have; not read")
        body = bytearray()
        try:
            for chunk in r.iter_bytes():
                body += chunk
                if len(body) > limit:
                    if refuse_more:
                        raise StipProtocolError(f"{self.base_url}{path} answered more than {limit} bytes")
                    return bytes(body[:limit])
        except httpx.HTTPError as e:
            raise self._connection_error(e) from None
        return bytes(body)

    def _connection_error(self, e: httpx.HTTPError) -> StipConnectionError:
        cause = tls_cause(e)
        if isinstance(cause, ssl.SSLCertVerificationError):
            return cert_error(self.base_url, cause, self.ca_file)
        if cause is not None:
            return StipConnectionError(f"TLS handshake with {self.base_url} failed: {cause}")
        if isinstance(e, httpx.TimeoutException) and not isinstance(e, httpx.ConnectTimeout):
            return StipConnectionError(f"no answer from {self.peer} at {self.base_url} within {self.timeout} s")
        return StipConnectionError(f"cannot reach {self.peer} at {self.base_url}: {e or type(e).__name__}"
                                   f"{self.hint}")

    def __del__(self):
        try:
            self._client.close()
        except Exception:
            pass


def error_detail(body: bytes) -> str | None:
    """The server's {"error": "..."} message from an error answer, or None when it sent none."""
    try:
        detail = json.loads(body).get("error")
    except Exception:  # noqa: BLE001 - not our JSON: the status alone says it
        return None
    return detail[:2000] if isinstance(detail, str) else None
