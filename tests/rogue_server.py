"""A misbehaving STIP server for tests: a real WebSocket server on loopback that breaks the protocol on purpose.

    python -m tests.rogue_server        # prints its port, then serves until killed

The first path segment picks the misbehaviour: a client pointed at http://127.0.0.1:PORT/index gets top-k indices
outside the vocabulary, /good gets correct replies (to show the client accepts a well-behaved server), and so on
(see MODES). Replies are computed from the request the way a real server shapes them, then corrupted.
"""

from __future__ import annotations

import asyncio
import math
import struct
import sys

from websockets.asyncio.server import serve

from stip.common import wire

VOCAB, HIDDEN = 50, 8

MODES = ("good", "protocol", "nohello", "bighello", "texthello", "index", "repeat", "shape", "dtype", "kind",
         "position", "nan", "order", "short", "oversized", "badstatus")


def hello(mode: str) -> bytes:
    h = {"ok": True, "kind": "hello", "session": "rogue-session", "position": 0, "bundle_id": "rogue",
         "hidden_size": HIDDEN, "vocab_size": VOCAB, "max_seq_len": 64, "max_message_bytes": 1 << 20,
         "protocol": wire.PROTOCOL_VERSION}
    if mode == "protocol":
        h["protocol"] = wire.PROTOCOL_VERSION - 1
    if mode == "nohello":
        h["kind"] = "topk"
    payload = b"\0" * (256 * 1024) if mode == "bighello" else b""
    return wire.encode_frame(h, payload)


def reply(mode: str, req: dict, position: int) -> bytes:
    """The reply a real server would send to `req` (values made up), corrupted as `mode` says."""
    if mode == "badstatus":
        return wire.encode_frame({"ok": False, "status": "teapot", "error": 5})
    rows = req["shape"][0] if len(req["shape"]) == 2 else 1
    n = rows if (req["op"] == "prefill" and req.get("positions") == "all") else 1
    dl = req.get("downlink", {})
    kind = dl.get("kind", "topk")
    k = min(int(dl.get("k", 64)), VOCAB) if kind == "topk" else VOCAB
    h = {"ok": True, "kind": kind, "shape": [n, k], "dtype": "float32", "position": position, "server_ms": 1.0}
    if kind == "logits":
        payload = struct.pack(f"<{n * k}f", *[float(-i) for i in range(k)] * n)
    else:
        indices = list(range(k))
        values = [float(-i) for i in range(k)]
        lse = math.log(sum(math.exp(v) for v in values))
        if mode == "index":
            indices[-1] = VOCAB  # one past the end
        if mode == "repeat":
            indices[1] = indices[0]
        if mode == "nan":
            values[0] = float("nan")
        if mode == "order":
            values[0], values[1] = values[1], values[0]
        payload = struct.pack(f"<{n * k}i", *indices * n) + struct.pack(f"<{n * k}f", *values * n) + \
            struct.pack(f"<{n}f", *[lse] * n)
    if mode == "shape":
        h["shape"] = [n, k + 1]
    if mode == "dtype":
        h["dtype"] = "float16"
    if mode == "kind":
        h["kind"] = "logits" if kind == "topk" else "topk"
    if mode == "position":
        h["position"] = position + 7
    if mode == "short":
        payload = payload[:-4]  # e.g. a version-1 top-k reply without the logsumexp row
    if mode == "oversized":
        payload += b"\0" * (8 * 1024 * 1024)
    return wire.encode_frame(h, payload)


async def handler(ws) -> None:
    mode = ws.request.path.strip("/").split("/")[0]
    if mode == "texthello":
        await ws.send("hello")
        return await ws.wait_closed()
    await ws.send(hello(mode))
    position = 0
    async for data in ws:
        req, _ = wire.decode_frame(data)
        if req.get("op") == "close":
            await ws.send(wire.encode_frame({"ok": True, "kind": "closed", "position": 0}))
            break
        position += req["shape"][0] if len(req["shape"]) == 2 else 1
        await ws.send(reply(mode, req, position))


async def main() -> None:
    async with serve(handler, "127.0.0.1", 0, max_size=None, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        print(port, flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
