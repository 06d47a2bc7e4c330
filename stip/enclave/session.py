"""One client's WebSocket session at the enclave (`/v1/tee/session`): the hello that opens the channel, then
channel-sealed generate requests, each answered by sealed chunks, until the client closes, idles or breaks a rule.

The socket is already admitted (token, session limits) by stip.enclave.process.create_app; `step` runs the
generation's next step off the event loop (the backend batches it with other sessions'). Nothing secret is logged.
"""

from __future__ import annotations

import asyncio
import json
import logging

from fastapi import WebSocket
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect

from stip.common.channel import NONCE_BYTES, Channel
from stip.common.tee.platform import unb64
from stip.common.tee_protocol import POLICY_VIOLATION, TeeGenerateRequest
from stip.errors import StipError, TeeError

log = logging.getLogger("stip.enclave")

HELLO_TIMEOUT_S, IDLE_TIMEOUT_S = 30.0, 300.0  # a session slot is not held by a silent socket


async def serve_session(ws: WebSocket, enclave, step, client: str = "anonymous") -> None:
    """Accept `ws`, open the channel from its hello, then answer its requests. `enclave`: the stip.enclave.process
    backend; `step(fn, *args)`: awaits fn(*args) off the event loop; `client`: whose session this is (its steps
    get the client's fair share of the batched steps)."""
    await ws.accept()
    channel = await _open_channel(ws, enclave)
    if channel is None:
        return
    try:
        while True:
            try:
                msg = await asyncio.wait_for(ws.receive_bytes(), IDLE_TIMEOUT_S)
            except TimeoutError:
                await ws.close(1000, f"idle for {IDLE_TIMEOUT_S:.0f} s")
                return
            req = channel.open_json(msg)
            op = req.get("op") if isinstance(req, dict) else None
            if op == "close":
                await ws.close()
                return
            gen_req = await _generate_request(ws, channel, req)
            if gen_req is not None:
                await _send_generation(ws, channel, enclave.generate(gen_req, client), step)
    except TeeError as e:
        log.info("session refused: %s", e)
        await ws.close(POLICY_VIOLATION, str(e)[:120])
    except WebSocketDisconnect:
        pass


async def _open_channel(ws: WebSocket, enclave) -> Channel | None:
    """The channel the hello (client key, attested nonce) opens; None once the socket is closed for a bad or missing
    hello."""
    try:
        hello = json.loads(await asyncio.wait_for(ws.receive_text(), HELLO_TIMEOUT_S))
        return enclave.open_channel(unb64(hello.get("client_public_key"), "client_public_key", 32),
                                    unb64(hello.get("nonce"), "nonce", NONCE_BYTES))
    except (TeeError, ValueError, AttributeError, KeyError) as e:
        await ws.close(POLICY_VIOLATION, f"hello refused: {e}"[:120])
    except TimeoutError:
        await ws.close(POLICY_VIOLATION, f"no hello within {HELLO_TIMEOUT_S:.0f} s")
    except WebSocketDisconnect:
        pass
    return None


async def _generate_request(ws: WebSocket, channel: Channel, req) -> TeeGenerateRequest | None:
    """`req` as a generate request; None after a sealed 422 that names its first bad field."""
    try:
        return TeeGenerateRequest.model_validate(req)
    except ValidationError as e:
        err = e.errors()[0]
        await ws.send_bytes(channel.seal_json({"error": f"{'.'.join(map(str, err.get('loc', ())))}: "
                                                        f"{err.get('msg')}", "status": 422}))
        return None


async def _send_generation(ws: WebSocket, channel: Channel, chunks, step) -> None:
    """Each chunk of one generation, sealed; a refused request (422) or a failed step (502) ends it with a sealed
    error, and the session goes on."""
    try:
        while True:
            chunk = await step(next, chunks, None)
            if chunk is None:
                break
            await ws.send_bytes(channel.seal_json(chunk))
    except ValueError as e:
        await ws.send_bytes(channel.seal_json({"error": str(e), "status": 422}))
    except StipError as e:
        log.warning("generation failed: %s", type(e).__name__)
        await ws.send_bytes(channel.seal_json({"error": f"enclave: {e}", "status": 502}))
    finally:
        await step(chunks.close)
