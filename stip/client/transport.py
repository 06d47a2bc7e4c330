"""The client's side of the wire: a synchronous connection to a STIP server and its sessions.

One `RemoteSession` is one persistent WebSocket; each step sends one binary frame (embeddings in the server's secret
basis) and reads one (logits or top-k pairs in the server's permuted vocabulary order). The caller un-permutes with
`ClientBundle.plain_logits` / `plain_ids`. Thread-safe per session only in the sense that a session serialises its
own steps; use one session per thread for concurrency.

The client trusts nothing from the server: https/wss certificates are verified (system store, or only a pinned CA
file), a token never goes over plain http/ws to a non-loopback host unless the caller says `insecure=True`, HTTP
redirects are not followed, every reply frame is capped at what its request can legitimately produce, and every
reply header and payload is checked (protocol version, kind, shape, dtype, position, index range, finiteness) before
the caller sees it. Any violation raises `StipProtocolError` naming it.
"""

from __future__ import annotations

import json
import math
import os
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import torch

from stip.common import wire
from stip.common.hosts import is_loopback_host
from stip.errors import StipError


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


HELLO_MAX_BYTES = wire.HEADER_LEN.size + wire.MAX_HEADER_BYTES  # hello, close and error replies: a header only
HTTP_MAX_BYTES = 16 * 1024 * 1024  # /health and /metrics bodies
ENCODE_PATH = wire.ENCODE_PATH
ENCODE_MAX_BYTES = 1024**3  # an /v1/encode reply whose shape the caller did not state


@dataclass
class Downlink:
    kind: str = "topk"  # "logits" (all V logits) or "topk" (k index/value pairs)
    k: int = 64

    def header(self) -> dict:
        if self.kind == "logits":
            return {"kind": "logits"}
        if self.kind == "topk":
            return {"kind": "topk", "k": int(self.k)}
        raise ValueError(f"downlink kind must be 'logits' or 'topk', got {self.kind!r}")


@dataclass
class StepResult:
    logits: torch.Tensor | None  # float32 [n, V], permuted vocabulary order (kind logits)
    indices: torch.Tensor | None  # int64 [n, k], permuted vocabulary indices (kind topk)
    values: torch.Tensor | None  # float32 [n, k]
    position: int  # tokens in the server KV cache after this step
    server_ms: float  # server compute time reported by the server
    rtt_ms: float  # client-measured round trip
    bytes_sent: int
    bytes_received: int
    logsumexp: torch.Tensor | None = None  # float32 [n], each row's logsumexp over all V logits (kind topk)


def _ws_url(url: str, path: str, query: dict | None = None) -> str:
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"server URL must start with http://, https://, ws:// or wss://, got {url!r}")
    base = parts.path.rstrip("/")
    return urllib.parse.urlunsplit((scheme, parts.netloc, base + path, urllib.parse.urlencode(query or {}), ""))


def _http_url(url: str, path: str) -> str:
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, "", ""))


def tls_context(url: str, ca_file: str | os.PathLike | None = None) -> ssl.SSLContext | None:
    """The SSLContext for https/wss URLs (None for plain http/ws): verifies the certificate and host name against
    the system trust store, or against `ca_file` only (CA pinning) when given."""
    scheme = urllib.parse.urlsplit(url if "://" in url else f"http://{url}").scheme
    secure = scheme in ("https", "wss")
    if ca_file is None:
        return ssl.create_default_context() if secure else None
    if not secure:
        raise StipError(f"a CA file was given but {url} is not https:// or wss://: "
                        f"nothing would be verified; use an https:// URL")
    if not os.path.isfile(ca_file):
        raise StipError(f"CA file {ca_file} does not exist or is not a file")
    try:
        return ssl.create_default_context(cafile=os.fspath(ca_file))
    except (ssl.SSLError, OSError, ValueError) as e:
        raise StipError(f"cannot load the CA file {ca_file}: {e}") from None


def _cert_error(url: str, e: Exception, ca_file) -> StipCertificateError:
    where = f"the pinned CA file {ca_file}" if ca_file else "the system trust store"
    why = getattr(e, "verify_message", None) or getattr(e, "reason", None) or e
    return StipCertificateError(f"TLS certificate of {url} did not verify against {where}: {why}"
                                + ("" if ca_file else " (pass the server's CA with --ca-file / ca_file=)"))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are errors: following one could carry the bearer token to another (or a plain http) host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _legacy_kw(connect) -> dict:
    """websockets >= 16 warns unless a directly-returned connection is asked for explicitly."""
    import inspect

    return {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}


def _server_error(header: dict) -> StipError:
    """An {"ok": false} reply as an exception; a malformed one is a protocol error."""
    status, message = header.get("status"), header.get("error")
    if header.get("ok") is not False or not _is_int(status) or not 400 <= status < 600 or not isinstance(message, str):
        return StipProtocolError(f"malformed reply header from the server: {_clip(header)}")
    cls = StipAuthError if status in (401, 403) else StipServerError
    return cls(message[:2000], status)


def _clip(x, n: int = 200) -> str:
    r = repr(x)
    return r if len(r) <= n else r[:n] + "…"


class Connection:
    """A STIP server: `health()` over HTTP, sessions over WebSocket.

    https/wss URLs verify the server's certificate (system trust store, or only `ca_file` when given); HTTP and
    WebSocket share one SSLContext. A token is refused over plain http/ws to a non-loopback host unless
    `insecure=True`, which allows exactly that and nothing else (it never turns certificate checks off).
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0,
                 ca_file: str | os.PathLike | None = None, insecure: bool = False, bundle_id: str | None = None):
        """`bundle_id`: the context (client bundle) every request is for, sent in the X-STIP-Bundle header, so that a
        server with several contexts routes it (`stip.server.contexts`); None sends none."""
        self.url = url.rstrip("/")
        self.bundle_id = bundle_id
        self.token = token if token is not None else (os.environ.get("STIP_TOKEN") or None)
        self.timeout = timeout
        self.ca_file = ca_file
        self.insecure = insecure
        try:
            parts = urllib.parse.urlsplit(_http_url(self.url, ""))
            host = parts.hostname
        except ValueError as e:
            raise StipError(f"bad server URL {url!r}: {e}") from None
        if parts.scheme not in ("http", "https"):
            raise StipError(f"server URL must start with http://, https://, ws:// or wss://, got {url!r}")
        self.ssl = tls_context(self.url, ca_file)
        if self.token and self.ssl is None and not is_loopback_host(host) and not insecure:
            raise StipError(f"refusing to send the token in clear text to {host}: {url} is plain http/ws. Use "
                            f"https:// (the server's --ssl-certfile, or a TLS proxy in front), or pass --insecure "
                            f"(insecure=True) to send it unencrypted anyway")
        handlers: list = [_NoRedirect()]
        if self.ssl is not None:
            handlers.append(urllib.request.HTTPSHandler(context=self.ssl))
        self._opener = urllib.request.build_opener(*handlers)

    def _headers(self) -> dict:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if self.bundle_id:
            headers[wire.BUNDLE_HEADER] = self.bundle_id
        return headers

    def _get(self, path: str) -> bytes:
        return self._open(urllib.request.Request(_http_url(self.url, path), headers=self._headers()), path,
                          HTTP_MAX_BYTES)

    def _get_object(self, path: str) -> dict:
        try:
            obj = json.loads(self._get(path))
        except (UnicodeDecodeError, json.JSONDecodeError):
            obj = None
        if not isinstance(obj, dict):
            raise StipProtocolError(f"{self.url}{path} did not answer a JSON object (is this a STIP server?)")
        return obj

    def health(self) -> dict:
        return self._get_object("/health")

    def info(self) -> dict:
        """GET /v1/info (needs the token): the served bundle, its signer, the limits, this client's usage."""
        return self._get_object("/v1/info")

    def metrics(self) -> str:
        return self._get("/metrics").decode()

    def encode(self, embeds: torch.Tensor, mask: torch.Tensor | None = None, *,
               reply_shape: list[int] | None = None) -> torch.Tensor:
        """POST /v1/encode (one-shot models): embeddings [B, T, d] already in the secret basis, and a padding mask
        [B, T] (1 = token) or None -> the server's float32 output (hidden states in `p`, or permuted logits).
        `reply_shape`: the shape the caller expects; the reply is refused (StipProtocolError) if it differs, and
        never read past that size."""
        x = embeds.detach().contiguous()
        if x.dim() != 3 or x.dtype not in wire.DTYPE_NAMES:
            raise ValueError(f"embeddings must be [batch, tokens, hidden] in {', '.join(wire.DTYPES)}")
        header = {"op": "encode", "dtype": wire.DTYPE_NAMES[x.dtype], "shape": list(x.shape), "mask": mask is not None}
        parts = [wire.tensor_bytes(x)]
        if mask is not None:
            if tuple(mask.shape) != tuple(x.shape[:2]):
                raise ValueError(f"mask shape {list(mask.shape)} does not match embeddings {list(x.shape[:2])}")
            parts.append(wire.tensor_bytes(mask.to(torch.uint8)))
        limit = ENCODE_MAX_BYTES if reply_shape is None else math.prod(reply_shape) * 4 + HELLO_MAX_BYTES
        req = urllib.request.Request(_http_url(self.url, ENCODE_PATH), data=wire.encode_frame(header, *parts),
                                     headers={**self._headers(), "Content-Type": "application/octet-stream"},
                                     method="POST")
        body = self._open(req, ENCODE_PATH, limit)
        try:
            h, payload = wire.decode_frame(body)
        except wire.WireError as e:
            raise StipProtocolError(f"{ENCODE_PATH} answered a malformed frame: {e}") from None
        shape = h.get("shape")
        if (h.get("ok") is not True or h.get("kind") not in ("hidden", "logits") or h.get("dtype") != "float32"
                or not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape)):
            raise StipProtocolError(f"malformed {ENCODE_PATH} reply header: {_clip(h)}")
        if reply_shape is not None and shape != list(reply_shape):
            raise StipProtocolError(f"{ENCODE_PATH} replied shape {shape}, expected {list(reply_shape)}")
        if len(payload) != math.prod(shape) * 4:
            raise StipProtocolError(f"{ENCODE_PATH} reply has {len(payload)} payload bytes for shape {shape}")
        out = wire.tensor_from_bytes(payload, torch.float32, shape)
        if not bool(torch.isfinite(out).all()):
            raise StipProtocolError(f"{ENCODE_PATH} reply holds NaN or infinite values")
        return out

    def _open(self, req: urllib.request.Request, path: str, limit: int) -> bytes:
        """Send `req`, read at most `limit` bytes of the answer; HTTP errors carry the server's message."""
        try:
            with self._opener.open(req, timeout=self.timeout) as r:
                body = r.read(limit + 1)
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read(HTTP_MAX_BYTES)).get("error") or e.reason
            except Exception:
                detail = e.reason
            cls = StipAuthError if e.code in (401, 403) else StipServerError
            raise cls(f"server error {e.code} on {path}: {detail}", e.code) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise _cert_error(self.url, reason, self.ca_file) from None
            raise StipConnectionError(f"cannot reach the STIP server at {self.url}: {reason} "
                                      f"(is `stip serve` running there?)") from None
        if len(body) > limit:
            raise StipProtocolError(f"{self.url}{path} answered more than {limit} bytes")
        return body

    def open_session(self, resume: str | None = None) -> "RemoteSession":
        """A new session, or (`resume=id`) a session whose socket was detached or dropped, with its KV cache."""
        deadline = time.monotonic() + min(1.0, self.timeout)
        while True:
            try:
                return RemoteSession(self, resume)
            except StipServerError as e:
                # A dropped socket may still look attached to the server for a moment: retry briefly.
                if e.status != 409 or resume is None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def __repr__(self) -> str:
        return f"Connection({self.url!r})"


class RemoteSession:
    """One session on the server (its own KV cache), over one persistent WebSocket. A context manager."""

    def __init__(self, connection: Connection, resume: str | None = None):
        self.connection = connection
        self.id: str = ""
        self.position = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.info: dict = {}
        self._ws = None
        self._lock = threading.Lock()
        self._connect(resume)

    # ------------------------------------------------------------ connection

    def _connect(self, resume: str | None) -> None:
        from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
        from websockets.sync.client import connect

        conn = self.connection
        url = _ws_url(conn.url, wire.SESSION_PATH, {"session": resume} if resume else None)
        tls = {"ssl": conn.ssl} if conn.ssl is not None else {}
        try:
            self._ws = connect(url, additional_headers=conn._headers(), compression=None, max_size=HELLO_MAX_BYTES,
                               open_timeout=conn.timeout, close_timeout=min(5.0, conn.timeout),
                               user_agent_header="stip-client", **tls, **_legacy_kw(connect))
        except InvalidStatus as e:
            status = e.response.status_code
            try:
                detail = json.loads(e.response.body or b"{}").get("error")
            except Exception:
                detail = None
            if status in (401, 403):
                why = detail or ("token missing" if status == 401 else "token rejected")
                raise StipAuthError(f"the STIP server at {conn.url} refused the connection ({status}): {why}; "
                                    f"pass the server's token (--token or STIP_TOKEN)", status) from None
            raise StipServerError(f"the STIP server at {conn.url} refused the session ({status}): "
                                  f"{detail or 'no detail'}", status) from None
        except ssl.SSLCertVerificationError as e:
            raise _cert_error(conn.url, e, conn.ca_file) from None
        except ssl.SSLError as e:
            raise StipConnectionError(f"TLS handshake with {conn.url} failed: {e}") from None
        except (InvalidURI, ValueError) as e:
            raise StipConnectionError(f"bad server URL {conn.url!r}: {e}") from None
        except InvalidHandshake as e:
            raise StipProtocolError(f"{conn.url} did not complete a STIP WebSocket handshake: {e}") from None
        except (OSError, TimeoutError) as e:
            raise StipConnectionError(f"cannot reach the STIP server at {conn.url}: "
                                      f"{e.strerror or e if isinstance(e, OSError) else e} "
                                      f"(is `stip serve` running there?)") from None
        try:
            header, _ = self._recv()
            if header.get("ok") is not True:
                raise _server_error(header)
            self._check_hello(header)
        except StipError:
            self._drop()
            raise
        self.info = header
        self.id = header["session"]
        self.position = header["position"]

    def _check_hello(self, h: dict) -> None:
        url = self.connection.url
        if h.get("kind") != "hello":
            raise StipProtocolError(f"{url} sent no STIP hello frame (first reply kind {h.get('kind')!r})")
        if h.get("protocol") != wire.PROTOCOL_VERSION:
            raise StipProtocolError(f"{url} speaks STIP protocol version {h.get('protocol')!r}, this client speaks "
                                    f"{wire.PROTOCOL_VERSION}: upgrade the older side")
        sid = h.get("session")
        if not isinstance(sid, str) or not 0 < len(sid) <= 256:
            raise StipProtocolError(f"{url} sent a hello without a valid session id")
        for name in ("hidden_size", "vocab_size"):
            if not _is_int(h.get(name)) or h[name] < 1:
                raise StipProtocolError(f"{url} sent a hello with an invalid {name}: {h.get(name)!r}")
        for name in ("position", "max_seq_len", "max_message_bytes"):
            if name in h and (not _is_int(h[name]) or h[name] < 0):
                raise StipProtocolError(f"{url} sent a hello with an invalid {name}: {h[name]!r}")
        h.setdefault("position", 0)

    def _expect_reply(self, n_bytes: int) -> None:
        """Cap the next incoming frame at `n_bytes` (payload) plus a header; websockets refuses anything larger
        before reading it (close 1009). The frame's first bytes arrive after this call, so the cap applies."""
        ws = self._ws
        if ws is not None:
            with ws.protocol_mutex:
                ws.protocol.max_message_size = n_bytes + HELLO_MAX_BYTES

    def _drop(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                ws.close()
            except Exception:
                pass

    def _recv(self) -> tuple[dict, memoryview]:
        from websockets.exceptions import ConnectionClosed

        try:
            data = self._ws.recv(timeout=self.connection.timeout)
        except TimeoutError:
            self._drop()
            raise StipConnectionError(f"no reply from {self.connection.url} within {self.connection.timeout} s"
                                      ) from None
        except ConnectionClosed as e:
            self._ws = None
            rcvd, sent = e.rcvd, e.sent
            if sent is not None and sent.code == 1009:
                raise StipProtocolError(f"{self.connection.url} sent a frame larger than this request can produce "
                                        f"({sent.reason or 'message too big'}); connection closed") from None
            if rcvd is not None and rcvd.code == 1009:
                raise StipServerError("message too large for the server (connection closed)", 413) from None
            if rcvd is not None and 4400 <= rcvd.code < 4600:
                raise StipServerError(rcvd.reason or f"connection closed by the server ({rcvd.code})",
                                      rcvd.code - 4000) from None
            raise StipConnectionError(f"the connection to {self.connection.url} closed"
                                      f"{f' ({rcvd.code} {rcvd.reason})' if rcvd else ''}") from None
        if isinstance(data, str):
            self._drop()
            raise StipProtocolError("the server sent a text frame; expected binary STIP frames")
        self.bytes_received += len(data)
        try:
            header, payload = wire.decode_frame(data)
        except wire.WireError as e:
            self._drop()
            raise StipProtocolError(f"bad frame from the server: {e}") from None
        return header, payload

    def _send(self, frame: bytes) -> None:
        from websockets.exceptions import ConnectionClosed

        if self._ws is None:
            raise StipConnectionError(f"session {self.id[:8]}… is not connected (closed, or the connection "
                                      f"dropped; reopen it with Connection.open_session(resume=id))")
        try:
            self._ws.send(frame)
        except ConnectionClosed as e:
            self._ws = None
            raise StipConnectionError(f"the connection to {self.connection.url} closed: {e}") from None
        self.bytes_sent += len(frame)

    # ------------------------------------------------------------ steps

    def _step(self, op: str, x: torch.Tensor, dtype: torch.dtype, downlink: Downlink,
              positions: str | None = None) -> StepResult:
        if dtype not in wire.DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(wire.DTYPES)}, got {dtype}")
        x = x.detach()
        if x.dtype != dtype:
            x = x.to(dtype)
        frame = wire.encode_frame(wire.request_header(op, x.shape, dtype, positions, downlink.header()),
                                  wire.tensor_bytes(x))
        vocab = self.info.get("vocab_size", 0)
        rows = x.shape[0] if x.dim() == 2 else 1
        n = rows if (op == "prefill" and positions == "all") else 1
        cols = vocab if downlink.kind == "logits" else min(int(downlink.k), vocab)
        size = n * cols * 4 if downlink.kind == "logits" else n * (cols * 8 + 4)
        with self._lock:
            sent0, rcvd0 = self.bytes_sent, self.bytes_received
            position = self.position + rows
            t0 = time.perf_counter()
            self._expect_reply(size)
            self._send(frame)
            header, payload = self._recv()
            rtt = (time.perf_counter() - t0) * 1000
            if header.get("ok") is not True:
                error = _server_error(header)
                if header.get("fatal") or isinstance(error, StipProtocolError):
                    self._drop()
                raise error
            try:
                out = self._check_reply(header, payload, downlink.kind, n, cols, size, position)
            except StipProtocolError:
                self._drop()  # the session's state is unknown: never continue it
                raise
            self.position = position
        return StepResult(*out[:3], position, out[4], rtt, self.bytes_sent - sent0, self.bytes_received - rcvd0,
                          out[3])

    def _check_reply(self, h: dict, payload: memoryview, kind: str, n: int, cols: int, size: int, position: int):
        """(logits, indices, values, logsumexp, server_ms) from a reply, or StipProtocolError naming what is wrong."""
        def bad(what: str) -> StipProtocolError:
            return StipProtocolError(f"bad reply from {self.connection.url}: {what}")

        if h.get("kind") != kind:
            raise bad(f"kind {_clip(h.get('kind'))}, but a {kind} reply was asked for")
        if h.get("shape") != [n, cols] or not all(_is_int(v) for v in h["shape"]):
            raise bad(f"shape {_clip(h.get('shape'))}, expected [{n}, {cols}]")
        if h.get("dtype") != "float32":
            raise bad(f"dtype {_clip(h.get('dtype'))}, expected 'float32'")
        if not _is_int(h.get("position")) or h["position"] != position:
            raise bad(f"position {_clip(h.get('position'))}, expected {position} (the session is out of step)")
        ms = h.get("server_ms", 0.0)
        if not isinstance(ms, (int, float)) or isinstance(ms, bool) or not (math.isfinite(ms) and ms >= 0):
            raise bad(f"server_ms {_clip(ms)} is not a non-negative number")
        if len(payload) != size:
            raise bad(f"payload of {len(payload)} bytes, but shape [{n}, {cols}] {kind} needs {size}")
        logits = indices = values = lse = None
        if kind == "logits":
            logits = wire.tensor_from_bytes(payload, torch.float32, (n, cols))
            if torch.isnan(logits).any() or torch.isposinf(logits).any():
                raise bad("logits contain NaN or +inf")
        else:
            m = n * cols * 4
            idx = wire.tensor_from_bytes(payload[:m], torch.int32, (n, cols))
            values = wire.tensor_from_bytes(payload[m:2 * m], torch.float32, (n, cols))
            lse = wire.tensor_from_bytes(payload[2 * m:], torch.float32, (n,))
            vocab = self.info["vocab_size"]
            if cols and (int(idx.min()) < 0 or int(idx.max()) >= vocab):
                raise bad(f"top-k index out of range [0, {vocab}): {int(idx.min())}..{int(idx.max())}")
            if cols > 1 and bool((idx.sort(dim=-1).values.diff(dim=-1) == 0).any()):
                raise bad("top-k indices repeat within a row")
            if torch.isnan(values).any() or torch.isposinf(values).any():
                raise bad("top-k values contain NaN or +inf")
            if cols > 1 and bool((values.diff(dim=-1) > 0).any()):
                raise bad("top-k values are not in descending order")
            if not bool(torch.isfinite(lse).all()) or (cols and bool((lse < values[:, 0] - 1e-3).any())):
                raise bad("logsumexp is not finite, or below the largest value of its row")
            indices = idx.long()
        return logits, indices, values, lse, float(ms)

    def prefill(self, embeds: torch.Tensor, positions: str = "last", downlink: Downlink = Downlink(),
                dtype: torch.dtype = torch.float32) -> StepResult:
        """Append embeddings [T, d] (server basis) to the session; logits of the last (or every) position.

        A prompt larger than the server's message limit goes as several prefill steps (same result, same cache).
        """
        if embeds.dim() == 3 and embeds.shape[0] == 1:
            embeds = embeds[0]
        if embeds.dim() != 2:
            raise ValueError(f"prefill takes embeddings of shape [T, d], got {list(embeds.shape)}")
        if positions not in wire.POSITIONS:
            raise ValueError(f"positions must be 'last' or 'all', got {positions!r}")
        limit = int(self.info.get("max_message_bytes") or 0)
        row = embeds.shape[1] * dtype.itemsize
        rows = max(1, (limit - 4096) // row) if limit else embeds.shape[0]
        if embeds.shape[0] <= rows:
            return self._step("prefill", embeds, dtype, downlink, positions)
        # Longer than one message may carry: several prefill steps on the same KV cache.
        parts = [self._step("prefill", chunk, dtype, downlink, positions) for chunk in embeds.split(rows)]
        last = parts[-1]
        if positions == "all":
            cat = (lambda name: torch.cat([getattr(p, name) for p in parts])
                   if getattr(last, name) is not None else None)
            logits, indices, values, lse = cat("logits"), cat("indices"), cat("values"), cat("logsumexp")
        else:
            logits, indices, values, lse = last.logits, last.indices, last.values, last.logsumexp
        return StepResult(logits, indices, values, last.position, sum(p.server_ms for p in parts),
                          sum(p.rtt_ms for p in parts), sum(p.bytes_sent for p in parts),
                          sum(p.bytes_received for p in parts), lse)

    def decode(self, embed: torch.Tensor, downlink: Downlink = Downlink(), dtype: torch.dtype = torch.float32
               ) -> StepResult:
        """Append one embedding ([d] or [1, d]); logits of that position."""
        if embed.numel() != embed.shape[-1] or embed.dim() > 3:
            raise ValueError(f"decode takes one embedding of shape [d] or [1, d], got {list(embed.shape)}")
        return self._step("decode", embed.reshape(1, -1), dtype, downlink)

    # ------------------------------------------------------------ ending

    @property
    def connected(self) -> bool:
        return self._ws is not None

    def detach(self) -> None:
        """Close the socket but keep the session (and its KV cache) on the server until its TTL, for `resume`."""
        self._drop()

    def close(self) -> None:
        """End the session: the server frees its KV cache. Idempotent; never raises for a dead connection."""
        if self._ws is None:
            return
        with self._lock:
            try:
                self._expect_reply(0)
                self._send(wire.encode_frame({"op": "close"}))
                self._recv()
            except StipError:
                pass
            finally:
                self._drop()

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self._drop()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"RemoteSession({self.id[:8]}…, position={self.position})"
