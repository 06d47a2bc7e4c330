"""`stip proxy`: an OpenAI-compatible endpoint that talks STIP to the model server.

Any OpenAI client (base_url=http://127.0.0.1:PORT/v1) gets private inference unchanged: the proxy tokenizes, embeds
and permutes on this machine, and the server never sees text. `GET /v1/models`, `POST /v1/chat/completions`,
`POST /v1/completions`, streaming (SSE) or not, n choices, logprobs, presence and frequency penalties; for an
encoder (feature-extraction) bundle `POST /v1/embeddings` instead (`proxy_embeddings`).

The proxy handles plaintext prompts and answers, so it listens on loopback only and answers only requests addressed
to loopback (the Host header, against DNS rebinding), unless it has an API key of its own (`--api-key` /
STIP_PROXY_API_KEY); with a key, every /v1 request must carry `Authorization: Bearer KEY`, and off loopback it serves
https only (`proxy_guard`). The parts: request bodies and their allow-list in `proxy_requests`, chat and
completions in `proxy_completions`, generation threads in `proxy_generation`, response bodies in `proxy_responses`,
SSE in `proxy_sse`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from stip.client.proxy_completions import completions_router
from stip.client.proxy_embeddings import embeddings_router
from stip.client.proxy_guard import BearerAuth, HostCheck, check_listen, error_response as _error
from stip.client.proxy_requests import ApiError, validation_error


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
    text_routes = completions_router(client, model_name)
    _add_error_handlers(app)

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "stip"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    v1.include_router(text_routes)
    v1.include_router(embeddings_router(client, model_name))
    app.include_router(v1)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, the proxy's own and FastAPI's (validation, 404, 405), answers in OpenAI's error format."""

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
