"""What the client's transport raises: one class per thing a caller handles differently (retry, re-authenticate,
fix the certificate setup, or stop trusting the server), and the helpers that turn a server's answer into one."""

from __future__ import annotations

import ssl

from stip.errors import StipError


class TaskError(StipError, ValueError):
    """A request the bundle's model cannot answer (embeddings from a classifier, labels from a base model)."""


class StipConnectionError(StipError):
    """The server could not be reached, or the connection dropped."""


class StipServerError(StipError):
    """The server answered a request with an error ({"ok": false}); `status` is its HTTP-like status."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


class StipAuthError(StipServerError):
    """The server refused the token (401: none sent, 403: wrong)."""


class StipProtocolError(StipError):
    """The server sent something that is not a STIP frame (a version mismatch or not a STIP server)."""


class StipCertificateError(StipConnectionError):
    """The server's TLS certificate did not verify against the system store or the pinned CA file."""


class StipReplayLimitError(StipConnectionError):
    """The server lost one generation's session more often than the client replays a context (`Client.max_replays`):
    every replay re-sends the context, so a server that keeps losing it is refused, not fed."""


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def clip(x, n: int = 200) -> str:
    """`repr(x)`, cut to `n` characters: what a server sent, quoted in an error without flooding it."""
    r = repr(x)
    return r if len(r) <= n else r[:n] + "…"


def server_error(header: dict) -> StipError:
    """An {"ok": false} reply as an exception; a malformed one is a protocol error."""
    status, message = header.get("status"), header.get("error")
    if header.get("ok") is not False or not is_int(status) or not 400 <= status < 600 or not isinstance(message, str):
        return StipProtocolError(f"malformed reply header from the server: {clip(header)}")
    cls = StipAuthError if status in (401, 403) else StipServerError
    return cls(message[:2000], status)


def status_error(status: int, path: str, detail: str | None) -> StipServerError:
    """An HTTP error status as an exception (401/403: StipAuthError), naming the path and the server's message."""
    cls = StipAuthError if status in (401, 403) else StipServerError
    return cls(f"server error {status} on {path}: {detail or 'no detail'}", status)


def cert_error(url: str, e: Exception, ca_file) -> StipCertificateError:
    where = f"the pinned CA file {ca_file}" if ca_file else "the system trust store"
    why = getattr(e, "verify_message", None) or getattr(e, "reason", None) or e
    return StipCertificateError(f"TLS certificate of {url} did not verify against {where}: {why}"
                                + ("" if ca_file else " (pass the server's CA with --ca-file / ca_file=)"))


def tls_cause(e: BaseException) -> ssl.SSLError | None:
    """The TLS error somewhere in `e`'s chain of causes (HTTP libraries wrap it), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, ssl.SSLError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None
