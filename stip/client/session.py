"""One session on a STIP server (its own KV cache) over one persistent WebSocket: the client's side of a step.

Each step sends one binary frame (embeddings in the server's secret basis) and reads one (logits or top-k pairs in
the server's permuted vocabulary order); the caller un-permutes with `ClientBundle.plain_logits` / `plain_ids`. A
session serialises its own steps; use one session per thread for concurrency. Every reply frame is capped at what
its request can legitimately produce before it is read, and checked (`stip.client.replies`) before the caller sees
it; after a reply it cannot trust, the session drops its socket and is never continued.

Embeddings go in as numpy arrays (the light client) or torch tensors; a step's reply comes back as numpy arrays, or
as torch tensors where the embeddings were torch tensors (`stip.common.arrays`).
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from dataclasses import dataclass, fields

import numpy as np

from stip.client.errors import (StipAuthError, StipConnectionError, StipProtocolError, StipServerError, cert_error,
                                server_error)
from stip.client.head import check_placement
from stip.client.http import ws_url
from stip.client.replies import Expected, check_hello, check_reply
from stip.common import wire
from stip.common.arrays import is_torch, like, to_numpy
from stip.errors import StipError

HELLO_MAX_BYTES = wire.HEADER_LEN.size + wire.MAX_HEADER_BYTES  # hello, close and error replies: a header only


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
    logits: np.ndarray | None  # float32 [n, V], permuted vocabulary order (kind logits)
    indices: np.ndarray | None  # int64 [n, k], permuted vocabulary indices (kind topk)
    values: np.ndarray | None  # float32 [n, k]
    position: int  # tokens in the server KV cache after this step
    server_ms: float | None  # server compute time, if the server reports it (`stip serve --expose-timing`)
    rtt_ms: float  # client-measured round trip
    bytes_sent: int
    bytes_received: int
    logsumexp: np.ndarray | None = None  # float32 [n], each row's logsumexp over all V logits (kind topk)
    target_logits: np.ndarray | None = None  # float32 [n], each row's logit at the index asked for (`targets`)
    head_ms: float = 0.0  # --head client: the client's own LM-head matmul (after the round trip, not in rtt_ms)

    def like(self, ref) -> "StepResult":
        """This result with its arrays as torch tensors if `ref` (what the caller sent) is one."""
        if is_torch(ref):
            for f in fields(self):
                value = getattr(self, f.name)
                if isinstance(value, np.ndarray):
                    setattr(self, f.name, like(value, ref))
        return self


def ws_connect(url: str, **kw):
    """websockets' synchronous connect, returning the connection, under the client's HTTP rules (`stip.client.http`):
    a redirect is never followed (its 3xx answer is an InvalidStatus) and no proxy is taken from the environment."""
    import inspect

    from websockets.sync.client import connect

    params = inspect.signature(connect).parameters
    if "proxy" in params:
        kw.setdefault("proxy", None)
    if "legacy" not in params:  # websockets < 17.1: its sync client follows no redirects
        return connect(url, **kw)
    connecter = connect(url, legacy=False, **kw)
    connecter.process_redirect = lambda exc: exc  # what websockets asks before following one: refuse it
    ws = connecter.connect()
    ws.pending_legacy_warning = False
    return ws


class RemoteSession:
    """One session on the server (its own KV cache), over one persistent WebSocket. A context manager."""

    def __init__(self, connection, resume: str | None = None):
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

        conn = self.connection
        url = ws_url(conn.url, wire.SESSION_PATH, {"session": resume} if resume else None)
        tls = {"ssl": conn.ssl} if conn.ssl is not None else {}
        try:
            self._ws = ws_connect(url, additional_headers=conn._headers(), compression=None,
                                  max_size=HELLO_MAX_BYTES, open_timeout=conn.timeout,
                                  close_timeout=min(5.0, conn.timeout), user_agent_header="stip-client", **tls)
        except InvalidStatus as e:
            status = e.response.status_code
            if 300 <= status < 400:
                where = str(e.response.headers.get("Location", ""))[:200]
                raise StipServerError(f"the STIP server at {conn.url} redirected the session ({status}) to "
                                      f"{where!r}: redirects are not followed", status) from None
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
            raise cert_error(conn.url, e, conn.ca_file) from None
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
                raise server_error(header)
            check_hello(self.connection.url, header)
            check_placement(self.connection.url, header.get("head"), self.connection.head)
        except StipError:
            self._drop()
            raise
        self.info = header
        self.id = header["session"]
        self.position = header["position"]

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

    def _step(self, op: str, x: np.ndarray, dtype: str, downlink: Downlink,
              positions: str | None = None, targets: np.ndarray | None = None) -> StepResult:
        head = self.connection.head  # --head client: the server sends hidden rows, the client's head makes logits
        sent_targets = targets if head is None else None
        extra = () if sent_targets is None else (wire.tensor_bytes(targets.astype(np.int32).reshape(-1)),)
        frame = wire.encode_frame(wire.request_header(op, x.shape, dtype, positions, downlink.header() if head is None
                                                      else head.downlink(), sent_targets is not None),
                                  wire.array_bytes(x, dtype), *extra)
        vocab = self.info.get("vocab_size", 0)
        rows = x.shape[0] if x.ndim == 2 else 1
        n = rows if (op == "prefill" and positions == "all") else 1
        cols = vocab if downlink.kind == "logits" else min(int(downlink.k), vocab)
        with self._lock:
            sent0, rcvd0 = self.bytes_sent, self.bytes_received
            want = Expected(downlink.kind, n, cols, self.position + rows, targets is not None) if head is None else \
                Expected("hidden", n, int(self.info["hidden_size"]), self.position + rows, dtype=head.wire_dtype)
            t0 = time.perf_counter()
            self._expect_reply(want.size)
            self._send(frame)
            header, payload = self._recv()
            rtt = (time.perf_counter() - t0) * 1000
            if header.get("ok") is not True:
                error = server_error(header)
                if header.get("fatal") or isinstance(error, StipProtocolError):
                    self._drop()
                raise error
            try:
                out = check_reply(self.connection.url, self.info["vocab_size"], header, payload, want)
            except StipProtocolError:
                self._drop()  # the session's state is unknown: never continue it
                raise
            self.position = want.position
            head_ms = 0.0
            if head is not None:
                t1 = time.perf_counter()
                logits, indices, values, lse, picked = head.reply(out[0], downlink.kind, cols, targets)
                out, head_ms = (logits, indices, values, lse, out[4], picked), (time.perf_counter() - t1) * 1000
        return StepResult(*out[:3], want.position, out[4], rtt, self.bytes_sent - sent0,
                          self.bytes_received - rcvd0, out[3], out[5], head_ms)

    def prefill(self, embeds, positions: str = "last", downlink: Downlink = Downlink(), dtype="float32",
                targets=None) -> StepResult:
        """Append embeddings [T, d] (server basis; numpy or torch) to the session; logits of the last (or every)
        position. `targets` (positions "all"): per position an index into the server's permuted vocabulary (-1:
        none) whose logit comes back too, in `target_logits`. `dtype`: what the rows travel as ("float32",
        "float16" or "bfloat16", or a numpy or torch dtype).

        A prompt larger than the server's message limit goes as several prefill steps (same result, same cache).
        """
        name, x = wire.dtype_name(dtype), to_numpy(embeds)
        if x.ndim == 3 and x.shape[0] == 1:
            x = x[0]
        if x.ndim != 2:
            raise ValueError(f"prefill takes embeddings of shape [T, d], got {list(x.shape)}")
        if positions not in wire.POSITIONS:
            raise ValueError(f"positions must be 'last' or 'all', got {positions!r}")
        aims = None if targets is None else to_numpy(targets).astype(np.int64).reshape(-1)
        if aims is not None and (positions != "all" or aims.size != x.shape[0]):
            raise ValueError("targets need positions='all' and one index per embedding")
        limit = int(self.info.get("max_message_bytes") or 0)
        row = x.shape[1] * wire.ITEMSIZE[name]
        rows = max(1, (limit - 4096) // row) if limit else x.shape[0]
        if x.shape[0] <= rows:
            return self._step("prefill", x, name, downlink, positions, aims).like(embeds)
        # Longer than one message may carry: several prefill steps on the same KV cache.
        parts = [self._step("prefill", x[a:a + rows], name, downlink, positions,
                            None if aims is None else aims[a:a + rows]) for a in range(0, x.shape[0], rows)]
        last = parts[-1]
        if positions == "all":
            cat = (lambda field: np.concatenate([getattr(p, field) for p in parts])
                   if getattr(last, field) is not None else None)
            logits, indices, values, lse = cat("logits"), cat("indices"), cat("values"), cat("logsumexp")
            picked = cat("target_logits")
        else:
            logits, indices, values, lse, picked = last.logits, last.indices, last.values, last.logsumexp, None
        reported = [p.server_ms for p in parts if p.server_ms is not None]
        return StepResult(logits, indices, values, last.position, sum(reported) if reported else None,
                          sum(p.rtt_ms for p in parts), sum(p.bytes_sent for p in parts),
                          sum(p.bytes_received for p in parts), lse, picked, sum(p.head_ms for p in parts)
                          ).like(embeds)

    def decode(self, embed, downlink: Downlink = Downlink(), dtype="float32") -> StepResult:
        """Append one embedding ([d] or [1, d]); logits of that position."""
        x = to_numpy(embed)
        if x.size != x.shape[-1] or x.ndim > 3:
            raise ValueError(f"decode takes one embedding of shape [d] or [1, d], got {list(x.shape)}")
        return self._step("decode", x.reshape(1, -1), wire.dtype_name(dtype), downlink).like(embed)

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
