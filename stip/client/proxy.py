"""`stip proxy`: an OpenAI-compatible endpoint that talks STIP to the model server.

Any OpenAI client (base_url=http://127.0.0.1:PORT/v1) gets private inference unchanged: the proxy tokenizes, embeds
and permutes on this machine, and the server never sees text. `GET /v1/models`, `POST /v1/chat/completions`,
`POST /v1/completions`, streaming (SSE) or not, n choices, logprobs, presence and frequency penalties; for an
encoder (feature-extraction) bundle `POST /v1/embeddings` instead (`proxy_embeddings`).

The proxy handles plaintext prompts and answers, so it listens on loopback only and answers only requests addressed
to loopback (the Host header, against DNS rebinding), unless it has an API key of its own (`--api-key` /
STIP_PROXY_API_KEY); with a key, every /v1 request must carry `Authorization: Bearer KEY`, and off loopback it serves
https only (`proxy_guard`). The parts: request bodies and their allow-list in `proxy_requests`, generation threads in
`proxy_generation`, response bodies in `proxy_responses`, SSE in `proxy_sse`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from stip.client import vision
from stip.client.proxy_embeddings import embeddings_router
from stip.client.proxy_generation import Generations
from stip.client.proxy_guard import BearerAuth, HostCheck, check_listen, error_response as _error
from stip.client.proxy_requests import (ApiError, ChatRequest, CompletionRequest, message_text,
                                        validation_error)
from stip.client.proxy_responses import ChatFormat, CompletionFormat, TokenText
from stip.client.proxy_sse import sse_response
from stip.common.tasks import FEATURE_EXTRACTION, SESSION_TASKS
from stip.errors import StipError

def create_app(client, model_name: str | None = None, api_key: str | None = None, allowed_hosts=()) -> FastAPI:
    """With `api_key`, /v1 requests must send it; without, only requests whose Host names loopback (or one of
    `allowed_hosts`) at the listening port are answered (stip.client.proxy_guard)."""
    model_name = model_name or f"stip-{client.bundle.config.get('model_type', 'model')}"
    app = FastAPI(title="STIP OpenAI-compatible proxy")
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    else:
        app.add_middleware(HostCheck, allowed_hosts=allowed_hosts)
    v1 = APIRouter(prefix="/v1")
    eos = set(client.bundle.eos_token_ids)
    token_text = TokenText(client.bundle)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        return _error(validation_error(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return _error(ApiError(e.status_code, str(e.detail),
                               kind="invalid_request_error" if e.status_code < 500 else "server_error"))

    def check_generates() -> None:
        """Chat and completions need a decoder bundle; an encoder's proxy says which endpoint it has instead."""
        task = client.bundle.task
        if task not in SESSION_TASKS:
            use = "use /v1/embeddings" if task == FEATURE_EXTRACTION else "the proxy has no OpenAI endpoint for it"
            raise ApiError(400, f"this proxy serves a {task} model ({model_name}), which does not generate text: "
                                f"{use}")

    def check_length(ids: list[int], param: str) -> None:
        if client.max_positions and len(ids) > client.max_positions:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this model takes at most "
                                f"{client.max_positions}", param, "context_length_exceeded")

    def check_top(top: int | None, param: str) -> None:
        dl = client.downlink
        if top is not None and dl.kind == "topk" and top > dl.k:
            raise ApiError(400, f"{param}={top}, but this proxy's top-k downlink carries {dl.k} tokens per step "
                                f"(run the proxy with a larger --k or --downlink logits)", param)

    def generations(ids: list[int], params: list, image_features=None) -> Generations:
        try:
            return Generations(client, ids, params, image_features)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    async def respond(req, gens: Generations, fmt, request: Request):
        if req.stream:
            return await sse_response(gens, fmt, request, eos, req.include_usage)
        return fmt.full(await gens.run(request), eos)

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "stip"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @v1.post("/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        check_generates()
        top = req.top
        check_top(top, "top_logprobs")
        params = req.sampling(req.max_completion_tokens or req.max_tokens, top)
        messages = [message_text(m) for m in req.messages]
        try:  # image parts (LLaVA): data URLs only, decoded here; a text-only model refuses them
            messages, images = vision.extract_images(client.bundle, messages)
        except vision.ImageInputError as e:
            raise ApiError(400, str(e), "messages") from None
        try:
            ids = client.encode(messages=messages)
        except Exception as e:  # a template that rejects the roles, say
            raise ApiError(400, f"could not apply the chat template: {e}", "messages") from None
        features = None
        if images:  # the vision tower runs once for all choices, off the event loop
            try:
                prepared = await asyncio.to_thread(vision.prepare, client.bundle, ids, images)
            except vision.ImageInputError as e:
                raise ApiError(400, str(e), "messages") from None
            ids, features = prepared.ids, prepared.features
        check_length(ids, "messages")
        gens = generations(ids, params, features)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model or model_name}
        return await respond(req, gens, ChatFormat(base, token_text, top), request)

    @v1.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_generates()
        top = req.top
        check_top(top, "logprobs")
        params = req.sampling(req.max_tokens, top)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request (a list of prompts is a batch)", "prompt")
            prompt = prompt[0]
        try:
            ids = client.encode(ids=prompt) if isinstance(prompt, list) else client.encode(prompt=prompt)
        except (ValueError, StipError) as e:
            raise ApiError(400, str(e), "prompt") from None
        if isinstance(prompt, list) and (min(ids) < 0 or max(ids) >= client.bundle.vocab_size):
            raise ApiError(400, f"token ids must be in [0, {client.bundle.vocab_size})", "prompt")
        check_length(ids, "prompt")
        echo = (prompt if isinstance(prompt, str) else client.tokenizer.decode(ids)) if req.echo else ""
        gens = generations(ids, params)
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model or model_name}
        return await respond(req, gens, CompletionFormat(base, token_text, top, echo), request)

    v1.include_router(embeddings_router(client, model_name))
    app.include_router(v1)
    return app


def run_proxy(bundle: Path, *, server: str, host: str = "127.0.0.1", port: int = 8080, token: str | None = None,
              downlink: str = "topk", k: int = 64, model_name: str | None = None, trusted=None,
              api_key: str | None = None, ca_file: str | Path | None = None, insecure: bool = False,
              allow_simulated: bool = False,
              ssl_certfile: str | Path | None = None, ssl_keyfile: str | Path | None = None,
              allowed_hosts: list[str] | tuple = ()) -> None:
    """A TEE client bundle (`stip protect --tee`) makes `server` the enclave's URL (stip.client.tee). `ca_file` and
    `insecure` apply to either. `ssl_certfile`/`ssl_keyfile`: serve https (required off loopback)."""
    import uvicorn

    from stip.client.sdk import Client
    from stip.client.tee import TeeClient, is_tee_bundle

    api_key = api_key or None
    # before anything else: no server contact for a refused start
    check_listen(host, api_key, ssl_certfile, ssl_keyfile, allowed_hosts)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if is_tee_bundle(bundle):
        client = TeeClient(bundle, server, allow_simulated=allow_simulated, trusted=trusted, token=token,
                           ca_file=ca_file, insecure=insecure)
    else:
        client = Client(bundle, server, token=token, downlink=downlink, k=k, trusted=trusted, ca_file=ca_file,
                        insecure=insecure)
    app = create_app(client, model_name, api_key=api_key, allowed_hosts=allowed_hosts)
    scheme = "https" if ssl_certfile else "http"
    print(f"STIP proxy: OpenAI-compatible API on {scheme}://{host}:{port}/v1 -> STIP server {server} "
          f"(bundle {client.bundle.bundle_id}; {'API key required' if api_key else 'loopback, no API key'})",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning",
                ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
                ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None)
