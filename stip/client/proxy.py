"""`stip proxy`: an OpenAI-compatible endpoint that talks STIP to the model server.

Any OpenAI client (base_url=http://127.0.0.1:PORT/v1) gets private inference unchanged: the proxy tokenizes, embeds
and permutes on this machine, and the server never sees text. `GET /v1/models` (and `/v1/models/{id}`),
`POST /v1/chat/completions`, `POST /v1/completions` (batches of prompts too), `POST /v1/responses` (text in, text
out), streaming (SSE) or not, n choices, logprobs, presence and frequency penalties, structured output and function
calling (`tools`: `proxy_tools`) by constrained decoding on this machine; for an encoder
(feature-extraction) bundle `POST /v1/embeddings` instead (`proxy_embeddings`). Opt-in CORS (`--cors-origin`).

The proxy handles plaintext prompts and answers, so it listens on loopback only and answers only requests addressed
to loopback (the Host header, against DNS rebinding), unless it has an API key of its own (`--api-key` /
STIP_PROXY_API_KEY); with a key, every /v1 request must carry `Authorization: Bearer KEY`, and off loopback it serves
https only (`proxy_guard`). The parts: request bodies and their allow-list in `proxy_requests`, chat and
completions in `proxy_completions`, the Responses API in `proxy_responses_api`, generation threads in
`proxy_generation`, response bodies in `proxy_responses`, SSE in `proxy_sse`, errors (OpenAI's body everywhere, a
404 that lists the routes) in `proxy_errors`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, FastAPI

from stip.client.proxy_completions import TextEndpoints, completions_router
from stip.client.proxy_embeddings import embeddings_router
from stip.client.proxy_errors import add_error_handlers
from stip.client.proxy_guard import BearerAuth, HostCheck, check_cors, check_listen
from stip.client.proxy_requests import ApiError
from stip.client.proxy_responses_api import responses_router


def create_app(client, model_name: str | None = None, api_key: str | None = None, allowed_hosts=(),
               cors_origins=()) -> FastAPI:
    """With `api_key`, /v1 requests must send it; without, only requests whose Host names loopback (or one of
    `allowed_hosts`) at the listening port are answered (stip.client.proxy_guard). `cors_origins`: web origins whose
    pages may call the proxy (CORS; none by default)."""
    model_name = model_name or f"stip-{client.bundle.config.get('model_type', 'model')}"
    app = FastAPI(title="STIP OpenAI-compatible proxy")
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    else:
        app.add_middleware(HostCheck, allowed_hosts=allowed_hosts)
    if cors_origins:  # added last, so outermost: preflights are answered, and refusals carry the CORS headers too
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], max_age=600)
    v1 = APIRouter(prefix="/v1")
    endpoints = TextEndpoints(client, model_name)
    add_error_handlers(app)
    card = {"id": model_name, "object": "model", "created": 0, "owned_by": "stip"}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [card]}

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise ApiError(404, f"The model `{model_id[:200]}` does not exist: this proxy serves `{model_name}`",
                           "model", "model_not_found")
        return card

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    v1.include_router(completions_router(endpoints))
    v1.include_router(responses_router(endpoints))
    v1.include_router(embeddings_router(client, model_name))
    app.include_router(v1)
    return app


def run_proxy(bundle: Path, *, server: str, host: str = "127.0.0.1", port: int = 8080, token: str | None = None,
              downlink: str = "topk", k: int = 64, model_name: str | None = None, trusted=None,
              api_key: str | None = None, ca_file: str | Path | None = None, insecure: bool = False,
              allow_simulated: bool = False,
              ssl_certfile: str | Path | None = None, ssl_keyfile: str | Path | None = None,
              allowed_hosts: list[str] | tuple = (), cors_origins: list[str] | tuple = ()) -> None:
    """A TEE client bundle (`stip protect --tee`) makes `server` the enclave's URL (stip.client.tee). `ca_file` and
    `insecure` apply to either. `ssl_certfile`/`ssl_keyfile`: serve https (required off loopback). `cors_origins`:
    web origins allowed to call the proxy from a browser (CORS)."""
    import uvicorn

    from stip.client.sdk import Client
    from stip.client.tee import TeeClient, is_tee_bundle

    api_key = api_key or None
    # before anything else: no server contact for a refused start
    check_listen(host, api_key, ssl_certfile, ssl_keyfile, allowed_hosts)
    check_cors(cors_origins, api_key)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if is_tee_bundle(bundle):
        client = TeeClient(bundle, server, allow_simulated=allow_simulated, trusted=trusted, token=token,
                           ca_file=ca_file, insecure=insecure)
    else:
        client = Client(bundle, server, token=token, downlink=downlink, k=k, trusted=trusted, ca_file=ca_file,
                        insecure=insecure)
    app = create_app(client, model_name, api_key=api_key, allowed_hosts=allowed_hosts, cors_origins=cors_origins)
    scheme = "https" if ssl_certfile else "http"
    print(f"STIP proxy: OpenAI-compatible API on {scheme}://{host}:{port}/v1 -> STIP server {server} "
          f"(bundle {client.bundle.bundle_id}; {'API key required' if api_key else 'loopback, no API key'})",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning",
                ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
                ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None)
