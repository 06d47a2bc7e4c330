"""The client's side of the wire: a synchronous connection to a STIP server and its sessions.

One `RemoteSession` is one persistent WebSocket; each step sends one binary frame (embeddings in the server's secret
basis) and reads one (logits or top-k pairs in the server's permuted vocabulary order). The caller un-permutes with
`ClientBundle.plain_logits` / `plain_ids`. Thread-safe per session only in the sense that a session serialises its
own steps; use one session per thread for concurrency.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import torch

from stip.common import wire
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


def _legacy_kw(connect) -> dict:
    """websockets >= 16 warns unless a directly-returned connection is asked for explicitly."""
    import inspect

    return {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}


def _server_error(header: dict) -> StipServerError:
    status = int(header.get("status", 500))
    message = str(header.get("error", "unknown server error"))
    cls = StipAuthError if status in (401, 403) else StipServerError
    return cls(message, status)


class Connection:
    """A STIP server: `health()` over HTTP, sessions over WebSocket."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.token = token if token is not None else (os.environ.get("STIP_TOKEN") or None)
        self.timeout = timeout

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _get(self, path: str) -> bytes:
        req = urllib.request.Request(_http_url(self.url, path), headers=self._headers())
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read()).get("error") or e.reason
            except Exception:
                detail = e.reason
            cls = StipAuthError if e.code in (401, 403) else StipServerError
            raise cls(f"server error {e.code} on {path}: {detail}", e.code) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise StipConnectionError(f"cannot reach the STIP server at {self.url}: {reason} "
                                      f"(is `stip serve` running there?)") from None

    def health(self) -> dict:
        return json.loads(self._get("/health"))

    def info(self) -> dict:
        """GET /v1/info (needs the token): the served bundle, its signer, the limits, this client's usage."""
        return json.loads(self._get("/v1/info"))

    def metrics(self) -> str:
        return self._get("/metrics").decode()

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
        try:
            self._ws = connect(url, additional_headers=conn._headers(), compression=None, max_size=None,
                               open_timeout=conn.timeout, close_timeout=min(5.0, conn.timeout),
                               user_agent_header="stip-client", **_legacy_kw(connect))
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
        except (InvalidURI, ValueError) as e:
            raise StipConnectionError(f"bad server URL {conn.url!r}: {e}") from None
        except InvalidHandshake as e:
            raise StipProtocolError(f"{conn.url} did not complete a STIP WebSocket handshake: {e}") from None
        except (OSError, TimeoutError) as e:
            raise StipConnectionError(f"cannot reach the STIP server at {conn.url}: "
                                      f"{e.strerror or e if isinstance(e, OSError) else e} "
                                      f"(is `stip serve` running there?)") from None
        header, _ = self._recv()
        if not header.get("ok"):
            self._drop()
            raise _server_error(header)
        if header.get("kind") != "hello" or "session" not in header:
            self._drop()
            raise StipProtocolError(f"{conn.url} sent no STIP hello frame")
        self.info = header
        self.id = header["session"]
        self.position = int(header.get("position", 0))

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
            rcvd = e.rcvd
            if rcvd is not None and rcvd.code == 1009:
                raise StipServerError("message too large for the server (connection closed)", 413) from None
            if rcvd is not None and 4400 <= rcvd.code < 4600:
                raise StipServerError(rcvd.reason or f"connection closed by the server ({rcvd.code})",
                                      rcvd.code - 4000) from None
            raise StipConnectionError(f"the connection to {self.connection.url} closed"
                                      f"{f' ({rcvd.code} {rcvd.reason})' if rcvd else ''}") from None
        if isinstance(data, str):
            raise StipProtocolError("the server sent a text frame; expected binary STIP frames")
        self.bytes_received += len(data)
        try:
            header, payload = wire.decode_frame(data)
        except wire.WireError as e:
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
        with self._lock:
            sent0, rcvd0 = self.bytes_sent, self.bytes_received
            t0 = time.perf_counter()
            self._send(frame)
            header, payload = self._recv()
            rtt = (time.perf_counter() - t0) * 1000
        if not header.get("ok"):
            if header.get("fatal"):
                self._drop()
            raise _server_error(header)
        shape = header.get("shape")
        kind = header.get("kind")
        logits = indices = values = None
        try:
            if kind == "logits":
                logits = wire.tensor_from_bytes(payload, torch.float32, shape)
            elif kind == "topk":
                n = shape[0] * shape[1] * 4
                indices = wire.tensor_from_bytes(payload[:n], torch.int32, shape).long()
                values = wire.tensor_from_bytes(payload[n:], torch.float32, shape)
            else:
                raise StipProtocolError(f"unexpected reply kind {kind!r}")
        except (RuntimeError, TypeError, IndexError) as e:
            raise StipProtocolError(f"reply payload does not match its header {shape}: {e}") from None
        self.position = int(header["position"])
        return StepResult(logits, indices, values, self.position, float(header.get("server_ms", 0.0)), rtt,
                          self.bytes_sent - sent0, self.bytes_received - rcvd0)

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
            logits, indices, values = cat("logits"), cat("indices"), cat("values")
        else:
            logits, indices, values = last.logits, last.indices, last.values
        return StepResult(logits, indices, values, last.position, sum(p.server_ms for p in parts),
                          sum(p.rtt_ms for p in parts), sum(p.bytes_sent for p in parts),
                          sum(p.bytes_received for p in parts))

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
