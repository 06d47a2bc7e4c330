"""The round-trip session WebSocket (`stip.common.wire.SESSION_PATH`): authenticate, pick the context the client
names, open or resume one of its own sessions, then one reply frame per request frame (`StipService.handle`). A
context past its rekey budget (`stip.server.key_usage`) refuses new sessions with 403 but resumes open ones."""

from __future__ import annotations

from fastapi import FastAPI, WebSocket
from starlette.websockets import WebSocketDisconnect

from stip.common import wire
from stip.common.generate import GENERATE_PATH
from stip.common.tasks import ONE_SHOT_TASKS
from stip.server.auth import AuthError
from stip.server.budget import AdmissionError
from stip.server.contexts import ContextError, Contexts
from stip.server.encode_route import ENCODE_PATH
from stip.server.refusals import no_context, refused


def add_session_route(app: FastAPI, contexts: Contexts) -> None:
    """The session WebSocket: authenticate, pick the context the client names, open or resume (own sessions only),
    then one reply per frame."""

    async def refuse_frame(websocket: WebSocket, status: int, message: str) -> None:
        await websocket.send_bytes(contexts.first.error_frame(status, message))  # metrics are shared
        await websocket.close(4000 + status)

    @app.websocket(wire.SESSION_PATH)
    async def session_socket(websocket: WebSocket):
        authorization = websocket.headers.get("authorization")
        service = contexts.first  # auth and metrics are shared by all contexts
        try:
            who = service.auth.authenticate(authorization)
            service = contexts.pick(websocket.headers)
        except AuthError as e:
            service.metrics.errors.labels(str(e.status)).inc()
            await websocket.send_denial_response(refused(e.status, str(e)))
            return
        except ContextError as e:
            service.metrics.errors.labels(str(e.status)).inc()
            await websocket.send_denial_response(no_context(e))
            return
        await websocket.accept()
        if service.task in ONE_SHOT_TASKS:
            return await refuse_frame(websocket, 400, f"this server serves a {service.task} model: it takes "
                                                      f"one-shot requests at POST {ENCODE_PATH}, not sessions")
        if service.mode != "round-trip":
            return await refuse_frame(websocket, 400, f"this server runs a {service.mode} bundle: it takes token ids "
                                                      f"at POST {GENERATE_PATH}, not embedding sessions; use a "
                                                      f"client bundle from the same `stip protect --mode "
                                                      f"{service.mode}` run")
        sid = websocket.query_params.get("session")
        if sid is not None:
            s = service.sessions.get(sid, owner=who.name)  # another client's session is as unknown as none
            if s is None:
                return await refuse_frame(websocket, 404, "unknown or expired session")
            if s.attached:
                return await refuse_frame(websocket, 409, "session is in use by another connection")
        else:
            try:  # a context past its rekey budget opens no new session; open ones (resumed above) go on
                service.check_key_budget()
            except AdmissionError as e:
                return await refuse_frame(websocket, e.status, str(e))
            try:
                service.admission.open_session(who.name, who.quota)
            except AdmissionError as e:
                service.metrics.refused.labels(e.reason).inc()
                return await refuse_frame(websocket, e.status, str(e))
            s = service.sessions.create(who.name)
            if hasattr(service.engine, "bind_client"):  # vLLM: the prefix-cache salt of the session's key
                service.engine.bind_client(s.state, who.name)
            service.metrics.sessions_opened.inc()
        s.attached = True
        s.touch()
        bytes_in = service.metrics.bytes.labels("in")
        bytes_out = service.metrics.bytes.labels("out")
        try:
            await websocket.send_bytes(wire.encode_frame(service.hello(s)))
            while True:
                msg = await websocket.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                data = msg.get("bytes")
                if data is not None:
                    bytes_in.inc(len(data))
                reply, close = await service.handle(s, data, authorization)
                bytes_out.inc(len(reply))
                await websocket.send_bytes(reply)
                if close is not None:
                    await websocket.close(close)
                    break
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the client went away: the session stays resumable until its TTL
        finally:
            s.attached = False
            s.touch()
