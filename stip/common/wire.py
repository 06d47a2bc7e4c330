"""The STIP wire format: one binary WebSocket frame per request or reply.

    frame = uint32 big-endian header length N | N bytes UTF-8 JSON header | raw little-endian tensor bytes

Request header (client -> server):
    {"op": "prefill" | "decode" | "close",
     "dtype": "float32" | "float16" | "bfloat16",
     "shape": [T, d]            (decode: [1, d] or [d]),
     "positions": "last" | "all"                  (prefill only; default "last"),
     "downlink": {"kind": "logits"} | {"kind": "topk", "k": K} | {"kind": "hidden", "dtype": "float32" | "float16"},
     "targets": true                              (optional; prefill with positions "all" only)}
    payload: the embeddings, C-contiguous, in `dtype`; with "targets", then int32 [T]: per position an index into
    the server's permuted vocabulary (or -1 for none) whose raw logit the reply also carries (prompt scoring: the
    client sends each position's next prompt token, mapped through its key, and gets its exact log-probability).

Reply header (server -> client):
    {"ok": true, "kind": "logits" | "topk" | "hidden" | "hello" | "closed", "shape": [n, V], [n, K] or [n, d],
     "dtype": "float32" (hidden: the dtype asked for),
     "position": tokens now in the session's KV cache; "server_ms": server compute time, only from a server started
     with `stip serve --expose-timing` (per-step times are a side channel on shared caches)}
    payload: logits: float32 [n, V]; topk: int32 indices [n, K], then float32 values [n, K], then float32
    logsumexp [n] of each row's full V logits (indices are in the server's permuted vocabulary order; the
    logsumexp is permutation-invariant, so values - logsumexp are the exact log-probabilities of those K tokens).
    hidden: [n, d] in the dtype asked for (float32 by default): the final normed hidden state of each row, in the
    secret basis, before the LM head. Only a server whose bundle was protected with `--head client` (manifest
    "head": "client") holds no LM head; it answers this downlink and no other, and every other server refuses it
    (400). The client multiplies by the head its own bundle holds (stip.client.head) and goes on as with logits.
    A request with "targets" gets, after that payload, float32 [n]: each row's logit at its target index (0 for -1);
    a hidden downlink takes no targets (the client picks them from the logits it computes).
    The first frame on every new socket is a "hello" reply (no payload) naming the session:
    {"ok": true, "kind": "hello", "session": id, "position": n, "bundle_id": ..., "hidden_size": d, "vocab_size": V,
     "max_seq_len": ..., "max_message_bytes": ..., "protocol": PROTOCOL_VERSION, "head": "server" | "client"}
    A client refuses a hello whose "protocol" differs from its own PROTOCOL_VERSION.
Error reply: {"ok": false, "status": 4xx/5xx, "error": "message"} (no payload). After an error with `"fatal": true`
the server closes the socket; otherwise the session is unchanged and the socket stays usable.

One-shot models (encoders, classifiers) take one HTTP request instead of a session: POST /v1/encode with one frame,
    {"op": "encode", "dtype": ..., "shape": [B, T, d], "mask": true | false}
    payload: the embeddings [B, T, d] in `dtype`, then (mask true) uint8 [B, T], 1 = token, 0 = padding;
and the reply is one frame {"ok": true, "kind": "hidden" | "logits", "shape": [...], "dtype": "float32"} (and
"server_ms" with --expose-timing) with float32 data (errors: the HTTP endpoints' JSON error). See
stip.server.encode_route.

Tensors never travel as JSON: the header carries dtype and shape, the bytes follow. Nothing here imports the model,
nor torch: the light client (numpy only) speaks the wire with numpy arrays and dtype names; the server and the
enclave pass torch tensors and dtypes and get torch tensors back (`DTYPES` and `DTYPE_NAMES`, their torch views, are
resolved on first use).
"""

from __future__ import annotations

import importlib
import json
import struct
import sys

import numpy as np

from stip.common.arrays import bf16_to_float32, float32_to_bf16, is_torch

PROTOCOL_VERSION = 2  # 2: top-k replies carry each row's logsumexp
SESSION_PATH = "/v1/session"
ENCODE_PATH = "/v1/encode"  # one-shot models (stip.server.encode_route): one request frame, one reply frame
BUNDLE_HEADER = "X-STIP-Bundle"  # the bundle id (context) a request is for (stip.server.contexts)
HEADER_LEN = struct.Struct(">I")
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADER_DEPTH = 16  # nesting of JSON objects/arrays in a header (deeper ones are refused before parsing)

WIRE_DTYPES = ("float32", "float16", "bfloat16")  # the request dtypes, by name
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
NUMPY_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int32": np.dtype("<i4"),
                "int64": np.dtype("<i8"), "uint8": np.dtype("u1"), "float64": np.dtype("<f8")}
OPS = ("prefill", "decode", "close")
POSITIONS = ("last", "all")
DOWNLINKS = ("logits", "topk", "hidden")
HIDDEN_DTYPES = ("float32", "float16")  # what a hidden downlink may ask the final hidden state in

_LITTLE = sys.byteorder == "little"


class WireError(ValueError):
    """A frame or header that breaks the protocol; `status` is the HTTP-like status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def encode_frame(header: dict, *payload: bytes | bytearray | memoryview) -> bytes:
    """One frame: length-prefixed compact JSON header, then the payload parts as they are."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join((HEADER_LEN.pack(len(head)), head, *payload))


def _nesting(raw: bytes) -> int:
    """Deepest bracket nesting of a JSON text, strings skipped. Cheap: real headers have a handful of brackets, so
    the character scan runs only when there are more brackets than the depth allowed."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_HEADER_DEPTH:
        return 0
    depth = deepest = 0
    in_string = escaped = False
    for c in raw:
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:  # quote
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif c in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def decode_frame(data: bytes | bytearray | memoryview) -> tuple[dict, memoryview]:
    """Split a frame into (header dict, payload view). Raises WireError(400) on anything malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("expected a binary frame (4-byte length + JSON header + tensor bytes), got a text frame")
    view = memoryview(data)
    if len(view) < HEADER_LEN.size:
        raise WireError(f"frame of {len(view)} bytes is shorter than the 4-byte header length prefix")
    (n,) = HEADER_LEN.unpack_from(view, 0)
    if n > MAX_HEADER_BYTES:
        raise WireError(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit (is this a STIP frame?)")
    if HEADER_LEN.size + n > len(view):
        raise WireError(f"header length {n} runs past the end of the {len(view)}-byte frame")
    raw = bytes(view[HEADER_LEN.size:HEADER_LEN.size + n])
    if _nesting(raw) > MAX_HEADER_DEPTH:
        raise WireError(f"frame header nests deeper than {MAX_HEADER_DEPTH} levels (a STIP header needs 2)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WireError(f"frame header is not valid UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise WireError("frame header must be a JSON object")
    return header, view[HEADER_LEN.size + n:]


def __getattr__(name: str):
    """`DTYPES` (name -> torch dtype) and `DTYPE_NAMES` (torch dtype -> name), for the server and the enclave, which
    hold torch tensors: built on first use, so that importing this module imports no torch."""
    if name in ("DTYPES", "DTYPE_NAMES"):
        torch = importlib.import_module("torch")
        dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        globals().update(DTYPES=dtypes, DTYPE_NAMES={v: k for k, v in dtypes.items()})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_name(dtype) -> str:
    """The wire name of a dtype given by name, as a numpy dtype or as a torch dtype ("float32", ...)."""
    if isinstance(dtype, str):
        name = dtype
    elif type(dtype).__module__.startswith("torch"):
        name = str(dtype).removeprefix("torch.")
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    if name not in WIRE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(WIRE_DTYPES)}, got {dtype}")
    return name


def tensor_bytes(t) -> bytes:
    """The raw little-endian bytes of a numpy array or a torch tensor (any of the wire dtypes, int32, int64,
    uint8), C order."""
    if is_torch(t):
        t = t.detach().contiguous().cpu()
        if str(t.dtype) == "torch.bfloat16":
            return t.view(sys.modules["torch"].int16).numpy().astype("<i2").tobytes()
        t = t.numpy()
    a = np.asarray(t)
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()


def array_bytes(x, name: str) -> bytes:
    """The bytes of `x` (numpy or torch, any float dtype) converted to the wire dtype `name`: what a request sends."""
    if is_torch(x):
        return tensor_bytes(x.to(__getattr__("DTYPES")[name]))
    x = np.asarray(x)
    if name == "bfloat16":
        return float32_to_bf16(x.astype(np.float32)).astype("<u2").tobytes()
    return np.ascontiguousarray(x, dtype=NUMPY_DTYPES[name]).tobytes()


def tensor_from_bytes(buf: bytes | bytearray | memoryview, dtype, shape: list[int] | tuple[int, ...]):
    """A fresh (writable, owned) array from little-endian bytes; the caller has checked the byte length. `dtype`: a
    name or numpy dtype gives a numpy array (bfloat16 as float32: numpy has none); a torch dtype gives a tensor."""
    if type(dtype).__module__.startswith("torch"):
        torch = sys.modules["torch"]
        t = torch.frombuffer(bytearray(buf), dtype=torch.uint8) if len(buf) else torch.empty(0, dtype=torch.uint8)
        size = dtype.itemsize
        if not _LITTLE and size > 1:
            t = t.reshape(-1, size).flip(-1).contiguous().reshape(-1)
        return t.view(dtype).reshape(tuple(shape))
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name == "bfloat16":
        return bf16_to_float32(np.frombuffer(buf, dtype="<u2")).reshape(tuple(shape))
    return np.frombuffer(buf, dtype=NUMPY_DTYPES[name]).astype(np.dtype(name), copy=True).reshape(tuple(shape))


def error_header(status: int, message: str, fatal: bool = False) -> dict:
    h = {"ok": False, "status": int(status), "error": message}
    if fatal:
        h["fatal"] = True
    return h


def request_header(op: str, shape=None, dtype=None, positions: str | None = None,
                   downlink: dict | None = None, targets: bool = False) -> dict:
    h: dict = {"op": op}
    if shape is not None:
        h["shape"] = [int(s) for s in shape]
    if dtype is not None:
        h["dtype"] = dtype_name(dtype)
    if positions is not None:
        h["positions"] = positions
    if downlink is not None:
        h["downlink"] = downlink
    if targets:
        h["targets"] = True
    return h
