"""Checks on what a STIP server sends over a session, before the caller sees any of it: the hello frame, and each
step's reply (kind, shape, dtype, position, size, index range, order, finiteness). Any violation is a
StipProtocolError naming it; the session then drops the socket, since its state is unknown."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stip.client.errors import StipProtocolError, clip, is_int
from stip.common import wire


@dataclass(frozen=True)
class Expected:
    """The one reply a step can legitimately get: `kind` ("logits", "topk" or "hidden"), `rows` x `cols`, after which
    the session holds `position` tokens; `targets`: each row also carries one float32 logit (a scored prompt token);
    `dtype`: the hidden state's (a hidden downlink asks for it), float32 for the others."""
    kind: str
    rows: int
    cols: int
    position: int
    targets: bool = False
    dtype: str = "float32"

    @property
    def size(self) -> int:
        """Payload bytes: float32 logits, int32 indices + float32 values + one float32 logsumexp per row, or hidden
        rows in `dtype`; then one float32 per row with targets."""
        if self.kind == "hidden":
            base = self.rows * self.cols * wire.DTYPES[self.dtype].itemsize
        else:
            base = self.rows * self.cols * 4 if self.kind == "logits" else self.rows * (self.cols * 8 + 4)
        return base + (self.rows * 4 if self.targets else 0)


def check_hello(url: str, h: dict) -> None:
    """Refuse a hello that is not a STIP session of this protocol version with sane sizes; default `position`."""
    if h.get("kind") != "hello":
        raise StipProtocolError(f"{url} sent no STIP hello frame (first reply kind {h.get('kind')!r})")
    if h.get("protocol") != wire.PROTOCOL_VERSION:
        raise StipProtocolError(f"{url} speaks STIP protocol version {h.get('protocol')!r}, this client speaks "
                                f"{wire.PROTOCOL_VERSION}: upgrade the older side")
    sid = h.get("session")
    if not isinstance(sid, str) or not 0 < len(sid) <= 256:
        raise StipProtocolError(f"{url} sent a hello without a valid session id")
    for name in ("hidden_size", "vocab_size"):
        if not is_int(h.get(name)) or h[name] < 1:
            raise StipProtocolError(f"{url} sent a hello with an invalid {name}: {h.get(name)!r}")
    for name in ("position", "max_seq_len", "max_message_bytes"):
        if name in h and (not is_int(h[name]) or h[name] < 0):
            raise StipProtocolError(f"{url} sent a hello with an invalid {name}: {h[name]!r}")
    h.setdefault("position", 0)


def check_reply(url: str, vocab: int, h: dict, payload: memoryview, want: Expected):
    """(logits, indices, values, logsumexp, server_ms or None, target logits or None) from a reply, or
    StipProtocolError naming what is wrong. A hidden reply's rows come back in the logits' place."""
    def bad(what: str) -> StipProtocolError:
        return StipProtocolError(f"bad reply from {url}: {what}")

    kind, n, cols = want.kind, want.rows, want.cols
    if h.get("kind") != kind:
        raise bad(f"kind {clip(h.get('kind'))}, but a {kind} reply was asked for")
    if h.get("shape") != [n, cols] or not all(is_int(v) for v in h["shape"]):
        raise bad(f"shape {clip(h.get('shape'))}, expected [{n}, {cols}]")
    if h.get("dtype") != want.dtype:
        raise bad(f"dtype {clip(h.get('dtype'))}, expected {want.dtype!r}")
    if not is_int(h.get("position")) or h["position"] != want.position:
        raise bad(f"position {clip(h.get('position'))}, expected {want.position} (the session is out of step)")
    ms = h.get("server_ms")  # reported only where the server's operator turned that on (`--expose-timing`)
    if ms is not None and (not isinstance(ms, (int, float)) or isinstance(ms, bool)
                           or not (math.isfinite(ms) and ms >= 0)):
        raise bad(f"server_ms {clip(ms)} is not a non-negative number")
    if len(payload) != want.size:
        raise bad(f"payload of {len(payload)} bytes, but shape [{n}, {cols}] {kind} needs {want.size}")
    logits = indices = values = lse = picked = None
    if want.targets:
        payload, tail = payload[:len(payload) - 4 * n], payload[len(payload) - 4 * n:]
        picked = wire.tensor_from_bytes(tail, "float32", (n,))
        if not bool(np.isfinite(picked).all()):
            raise bad("target logits are not finite")
    if kind == "hidden":  # the final hidden state (--head client): the caller's head makes the logits
        logits = wire.tensor_from_bytes(payload, want.dtype, (n, cols))
        if not bool(np.isfinite(logits).all()):
            raise bad("hidden state contains NaN or infinite values")
    elif kind == "logits":
        logits = wire.tensor_from_bytes(payload, "float32", (n, cols))
        if np.isnan(logits).any() or np.isposinf(logits).any():
            raise bad("logits contain NaN or +inf")
    else:
        m = n * cols * 4
        idx = wire.tensor_from_bytes(payload[:m], "int32", (n, cols))
        values = wire.tensor_from_bytes(payload[m:2 * m], "float32", (n, cols))
        lse = wire.tensor_from_bytes(payload[2 * m:], "float32", (n,))
        if cols and (int(idx.min()) < 0 or int(idx.max()) >= vocab):
            raise bad(f"top-k index out of range [0, {vocab}): {int(idx.min())}..{int(idx.max())}")
        if cols > 1 and bool((np.diff(np.sort(idx, axis=-1), axis=-1) == 0).any()):
            raise bad("top-k indices repeat within a row")
        if np.isnan(values).any() or np.isposinf(values).any():
            raise bad("top-k values contain NaN or +inf")
        if cols > 1 and bool((np.diff(values, axis=-1) > 0).any()):
            raise bad("top-k values are not in descending order")
        if not bool(np.isfinite(lse).all()) or (cols and bool((lse < values[:, 0] - 1e-3).any())):
            raise bad("logsumexp is not finite, or below the largest value of its row")
        if picked is not None and bool((picked > values[:, 0] + 1e-3).any()):
            raise bad("a target logit is above the largest value of its row")
        indices = idx.astype(np.int64)
    return logits, indices, values, lse, None if ms is None else float(ms), picked
