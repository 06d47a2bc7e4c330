"""The client's side of the wire: a synchronous connection to a STIP server, over HTTP and its sessions.

The client trusts nothing from the server: https/wss certificates are verified (system store, or only a pinned CA
file), a token never goes over plain http/ws to a non-loopback host unless the caller says `insecure=True`, no
redirect is followed, every answer is capped at what its request can legitimately produce, and every reply header
and payload is checked (protocol version, kind, shape, dtype, position, index range, finiteness) before the caller
sees it. Any violation raises `StipProtocolError` naming it.

The parts: `errors` (what is raised), `http` (the one HTTP stack: redirects, caps, TLS, timeouts), `session` (one
WebSocket session: `RemoteSession`, `Downlink`, `StepResult`), `replies` (the checks on what a session receives).
This module holds `Connection` and re-exports the names callers import from here.
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.parse

import numpy as np

from stip.client.errors import (StipAuthError, StipCertificateError, StipConnectionError,  # noqa: F401 - re-exported
                                StipProtocolError, StipReplayLimitError, StipServerError)
from stip.client.errors import cert_error as _cert_error, clip as _clip, is_int as _is_int  # noqa: F401
from stip.client.errors import server_error as _server_error  # noqa: F401
from stip.client.http import HTTP_MAX_BYTES, HttpClient, tls_context  # noqa: F401
from stip.client.http import http_url as _http_url, ws_url as _ws_url  # noqa: F401
from stip.client.session import HELLO_MAX_BYTES, Downlink, RemoteSession, StepResult  # noqa: F401
from stip.common import wire
from stip.common.arrays import like, to_numpy
from stip.common.hosts import is_loopback_host
from stip.common.ws import legacy_kw as _legacy_kw  # noqa: F401
from stip.errors import StipError

ENCODE_PATH = wire.ENCODE_PATH
ENCODE_MAX_BYTES = 1024**3  # an /v1/encode reply whose shape the caller did not state


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
        self.http = HttpClient(self.url, timeout=timeout, ssl=self.ssl, ca_file=ca_file)
        # --head client: the bundle's LM head (stip.client.head.ClientHead); its sessions then take hidden states
        self.head = None

    def _headers(self) -> dict:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if self.bundle_id:
            headers[wire.BUNDLE_HEADER] = self.bundle_id
        return headers

    def _get(self, path: str) -> bytes:
        return self.http.request("GET", path, headers=self._headers())

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

    def encode(self, embeds, mask=None, *, reply_shape: list[int] | None = None):
        """POST /v1/encode (one-shot models): embeddings [B, T, d] already in the secret basis, and a padding mask
        [B, T] (1 = token) or None -> the server's float32 output (hidden states in `p`, or permuted logits), numpy
        or torch as `embeds` is. `reply_shape`: the shape the caller expects; the reply is refused
        (StipProtocolError) if it differs, and never read past that size."""
        name = str(getattr(embeds, "dtype", "")).removeprefix("torch.")
        if len(getattr(embeds, "shape", ())) != 3 or name not in wire.WIRE_DTYPES:
            raise ValueError(f"embeddings must be [batch, tokens, hidden] in {', '.join(wire.WIRE_DTYPES)}")
        header = {"op": "encode", "dtype": name, "shape": [int(n) for n in embeds.shape], "mask": mask is not None}
        parts = [wire.tensor_bytes(embeds)]
        if mask is not None:
            m = to_numpy(mask)
            if tuple(m.shape) != tuple(embeds.shape[:2]):
                raise ValueError(f"mask shape {list(m.shape)} does not match embeddings {list(embeds.shape[:2])}")
            parts.append(m.astype(np.uint8).tobytes())
        limit = ENCODE_MAX_BYTES if reply_shape is None else math.prod(reply_shape) * 4 + HELLO_MAX_BYTES
        body = self.http.request("POST", ENCODE_PATH, content=wire.encode_frame(header, *parts), limit=limit,
                                 headers={**self._headers(), "Content-Type": "application/octet-stream"})
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
        out = wire.tensor_from_bytes(payload, "float32", shape)
        if not bool(np.isfinite(out).all()):
            raise StipProtocolError(f"{ENCODE_PATH} reply holds NaN or infinite values")
        return like(out, embeds)

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

    def close(self) -> None:
        """Close the pooled HTTP connections (sessions close on their own)."""
        self.http.close()

    def __repr__(self) -> str:
        return f"Connection({self.url!r})"
