"""A misbehaving STIP server for tests: a real WebSocket (and HTTP) server on loopback that breaks the protocol on
purpose.

    python -m tests.rogue_server [--bundle-id ID --signer FP --hidden D --vocab V --top I]
                                        # prints its port, then serves until killed

The first path segment picks the misbehaviour: a client pointed at http://127.0.0.1:PORT/index gets top-k indices
outside the vocabulary, /good gets correct replies (to show the client accepts a well-behaved server), and so on
(see MODES). Replies are computed from the request the way a real server shapes them, then corrupted; index `--top`
always ranks first. Over HTTP it answers GET /MODE/health and /MODE/v1/info as a server of the bundle named on its
command line (so that a real `stip.Client` connects), and GET /MODE/recorded with every row it received in that
mode (then forgets them): what a malicious server collects. Modes that force the client to replay its context:
`expire` forgets the session at every decode step (a 404 reply), `drop` cuts the socket at every decode step.
`redirect-PORT` answers every HTTP and WebSocket request with a redirect to 127.0.0.2:PORT; `big` answers
/v1/info with more than the client reads, announced in Content-Length, `bigstream` without announcing it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import struct
import sys

from websockets.asyncio.server import serve

from stip.common import wire

VOCAB, HIDDEN = 50, 8
BIG_BYTES = 17 * 1024 * 1024  # more than the client reads of an HTTP answer (stip.client.http.HTTP_MAX_BYTES)

MODES = ("good", "protocol", "nohello", "bighello", "texthello", "index", "repeat", "shape", "dtype", "kind",
         "position", "nan", "order", "short", "oversized", "badstatus", "expire", "drop", "redirect-PORT", "big",
         "bigstream")
SERVED = {"bundle_id": "rogue", "signer": "rogue", "top": 0}  # what /v1/info claims; the index ranked first
RECORDED: dict[str, list[dict]] = {}  # mode -> the step frames received: {"session", "op", "start", "rows"}
_session_ids = itertools.count()


def hello(mode: str) -> bytes:
    h = {"ok": True, "kind": "hello", "session": f"rogue-{next(_session_ids)}", "position": 0,
         "bundle_id": SERVED["bundle_id"],
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
    top = SERVED["top"]
    if kind == "logits":
        payload = struct.pack(f"<{n * k}f", *[0.0 if i == top else float(-i - 1) for i in range(k)] * n)
    else:
        indices = ([top] + [i for i in range(VOCAB) if i != top])[:k]
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


def record(mode: str, session: str, req: dict, payload, start: int) -> None:
    rows = wire.tensor_from_bytes(payload, wire.DTYPES[req["dtype"]], req["shape"]).reshape(-1, req["shape"][-1])
    RECORDED.setdefault(mode, []).append({"session": session, "op": req["op"], "start": start,
                                          "rows": rows.float().tolist()})


async def handler(ws) -> None:
    mode = ws.request.path.strip("/").split("/")[0]
    if mode == "texthello":
        await ws.send("hello")
        return await ws.wait_closed()
    first = hello(mode)
    session = wire.decode_frame(first)[0]["session"]
    await ws.send(first)
    position = 0
    async for data in ws:
        req, payload = wire.decode_frame(data)
        if req.get("op") == "close":
            await ws.send(wire.encode_frame({"ok": True, "kind": "closed", "position": 0}))
            break
        record(mode, session, req, payload, position)
        if mode == "drop" and req["op"] == "decode":
            ws.transport.abort()  # the socket drops mid-conversation
            return
        if mode == "expire" and req["op"] == "decode":
            await ws.send(wire.encode_frame({"ok": False, "status": 404, "error": "session expired"}))
            continue
        position += req["shape"][0] if len(req["shape"]) == 2 else 1
        await ws.send(reply(mode, req, position))


def http_answer(connection, request):
    """Plain HTTP requests (no WebSocket upgrade): /MODE/health, /MODE/v1/info, /MODE/recorded; a redirect mode
    redirects WebSocket handshakes too."""
    mode, _, rest = request.path.strip("/").partition("/")
    if mode.startswith("redirect-"):
        response = connection.respond(302, "moved\n")
        response.headers["Location"] = f"http://127.0.0.2:{mode.removeprefix('redirect-')}/{rest}"
        return response
    if "upgrade" in request.headers.get("Connection", "").lower():
        return None  # a session: the WebSocket handler
    if rest == "recorded":
        body = json.dumps(RECORDED.pop(mode, []))
    elif rest in ("health", "v1/info"):
        body = json.dumps({"status": "ok", "mode": "round-trip", "max_seq_len": 64, "bundle_id": SERVED["bundle_id"],
                           "signer": SERVED["signer"]})
    else:
        return connection.respond(404, "not found\n")
    response = connection.respond(200, body)
    response.headers["Content-Type"] = "application/json"
    if mode in ("big", "bigstream"):
        response.body = b" " * BIG_BYTES
        del response.headers["Content-Length"]
        if mode == "big":
            response.headers["Content-Length"] = str(BIG_BYTES)
    return response


async def main() -> None:
    async with serve(handler, "127.0.0.1", 0, max_size=None, compression=None, process_request=http_answer) as server:
        port = server.sockets[0].getsockname()[1]
        print(port, flush=True)
        await asyncio.Future()


def parse_args(argv: list[str]) -> None:
    global VOCAB, HIDDEN
    parser = argparse.ArgumentParser(prog="python -m tests.rogue_server")
    parser.add_argument("--bundle-id", default=SERVED["bundle_id"])
    parser.add_argument("--signer", default=SERVED["signer"])
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--top", type=int, default=0, help="the permuted index every reply ranks first")
    args = parser.parse_args(argv)
    VOCAB, HIDDEN = args.vocab, args.hidden
    SERVED.update(bundle_id=args.bundle_id, signer=args.signer, top=args.top)


if __name__ == "__main__":
    parse_args(sys.argv[1:])
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
