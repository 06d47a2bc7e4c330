"""The model server: FastAPI + uvicorn, one persistent binary WebSocket per session (see `stip.common.wire`).

This module wires the server together and runs it: one `StipService` per context (`stip.server.service`), the
routes (`http_routes`, `session_route`, `generate_route`, `encode_route`; none of them imports this module), and
`run_server`, which checks the options, loads the engines (`stip.server.engines`) and starts uvicorn.

The server process is given only the server bundle path and never opens client files.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from fastapi import FastAPI

from stip.common import wire
from stip.errors import StipError
from stip.server.auth import Authenticator
from stip.server.budget import Admission, Quota, default_budget_tokens
from stip.server.contexts import Contexts
from stip.server.encode_route import add_encode_route
from stip.server.engine import Engine
from stip.server.generate_route import add_generate_route
from stip.server.http_routes import add_http_routes
from stip.server.key_usage import KeyUsage
from stip.server.metrics import Metrics
from stip.server.serve_checks import check_modes as _check_modes  # noqa: F401 - tests/test_audit_tee.py
from stip.server.serve_checks import preflight, serve_limits
from stip.server.service import HEADER_SLACK, Settings, StipService, key_default_quota
from stip.server.session_route import add_session_route

log = logging.getLogger("stip.server")


def build_contexts(engines: list[tuple[Engine, str]], settings: Settings, usage: KeyUsage | None = None) -> Contexts:
    """One `StipService` per (engine, bundle id). A single context is exactly the server of one bundle; several share
    one Authenticator, one Admission (--max-sessions and the KV budget, counted in tokens of the costliest context,
    and every client's quota across contexts) and one Metrics (sums over contexts, and each context's tokens served).
    All share `usage`: the tokens each key served and the rekey budget (default: settings.rekey_after, in memory)."""
    contexts = Contexts([e for e, _ in engines])
    usage = usage or KeyUsage(settings.rekey_after)
    if len(engines) == 1:
        contexts.add(StipService(engines[0][0], settings, engines[0][1], usage=usage))
        return contexts
    limit = max(min(settings.max_seq_len, e.max_positions or settings.max_seq_len) for e, _ in engines)
    admission = Admission(settings.kv_budget_tokens or settings.max_sessions * limit, settings.max_sessions,
                          max(e.kv_bytes_per_token for e, _ in engines))
    auth = Authenticator(settings.token, settings.api_keys, settings.client_quota,
                         key_default_quota(settings.client_quota, settings.max_sessions, admission.total))
    metrics = Metrics(contexts.sessions, contexts.kv_caches, contexts.kv_tokens, lambda: admission.used,
                      lambda: admission.total, contexts.engine_stats)
    for engine, bundle_id in engines:
        contexts.add(StipService(engine, settings, bundle_id, auth=auth, admission=admission, metrics=metrics,
                                 usage=usage))
    return contexts


def create_app(engine: Engine | list[tuple[Engine, str]], settings: Settings, bundle_id: str = "",
               usage: KeyUsage | None = None):
    """The server's app: one engine and its bundle id, or several contexts [(engine, bundle id), ...] side by side
    (`stip.server.contexts`); `usage`: the tokens each key served, e.g. loaded from `--usage-file`."""
    contexts = build_contexts(engine if isinstance(engine, list) else [(engine, bundle_id)], settings, usage)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await contexts.start()
        try:
            yield
        finally:
            await contexts.stop()

    app = FastAPI(title="STIP model server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = contexts.first
    app.state.contexts = contexts

    add_http_routes(app, contexts)
    add_session_route(app, contexts)
    add_generate_route(app, contexts)
    add_encode_route(app, contexts)
    return app


def run_server(bundle: str | Path | list[str | Path], host: str = "127.0.0.1", port: int = 8000,
               token: str | None = None, max_sessions: int = 64, max_seq_len: int = 4096, session_ttl: float = 300.0,
               max_message_bytes: int | None = None, threads: int | None = None, log_level: str = "info",
               ssl_certfile: str | None = None, ssl_keyfile: str | None = None, dtype: str = "float32",
               device: str = "cpu", trusted=None, api_keys: str | Path | None = None,
               kv_budget_bytes: int | None = None, kv_budget_tokens: int | None = None,
               max_all_logits: int = Settings.max_all_logits, client_quota: Quota = Quota(),
               engine_kind: str = "transformers", prefill_chunk: int | None = None, batching: bool = True,
               vllm_options: dict | None = None, tee_worker: bool = False, capture: str | Path | None = None,
               capture_layers: str | list[int] | None = None, expose_timing: bool = False,
               rekey_after: int | None = None, usage_file: str | Path | None = None) -> None:
    """Load the server bundle (its signature checked against `trusted`, the developer's pinned signer(s), default
    $STIP_TRUSTED_SIGNERS) and serve it until interrupted. A list of bundles serves each as its own context, side by
    side (`stip.server.contexts`; transformers engine only). `capture`: record every step to that folder for
    `stip audit` (stip.server.capture; off by default). `expose_timing`: replies carry each step's server compute
    time (`stip serve --expose-timing`; off by default, since per-step times are a side channel on shared caches).
    `rekey_after`: tokens each context's key may serve before it takes no new sessions; `usage_file`: where those
    counts persist across restarts (stip.server.key_usage; default: in memory, no budget)."""
    token = token or os.environ.get("STIP_TOKEN") or None
    bundles = list(bundle) if isinstance(bundle, (list, tuple)) else [bundle]
    capture_layers, usage = preflight(  # a bad option or usage file stops here, before the model loads
        bundles, host=host, token=token, api_keys=api_keys, ssl_certfile=ssl_certfile, dtype=dtype,
        session_ttl=session_ttl, limits=serve_limits(max_sessions, max_seq_len, kv_budget_bytes, kv_budget_tokens,
                                                     max_all_logits),
        engine_kind=engine_kind, tee_worker=tee_worker, capture=capture, capture_layers=capture_layers,
        rekey_after=rekey_after, usage_file=usage_file)
    if threads:
        torch.set_num_threads(threads)
    if tee_worker:  # TEE mode: the enclave's WebSocket instead of client sessions (stip.server.tee_route)
        from stip.server.tee_route import serve_tee_worker

        return serve_tee_worker(bundles[0], host, port, token, api_keys, max_sessions, max_seq_len, session_ttl,
                                wire.DTYPES[dtype], device, trusted, log_level, ssl_certfile, ssl_keyfile,
                                kv_budget_tokens, kv_budget_bytes, capture, capture_layers)
    engines = _load_engines(bundles, engine_kind, wire.DTYPES[dtype], device, trusted, capture, capture_layers,
                            chunk_tokens=prefill_chunk, batching=batching, vllm_options=vllm_options)
    kv_bytes = max(e.kv_bytes_per_token for e, _ in engines)  # the budget counts tokens of the costliest context
    seq_len = max(min(max_seq_len, e.max_positions or max_seq_len) for e, _ in engines)
    if kv_budget_tokens is None and kv_budget_bytes is not None:
        kv_budget_tokens = max(1, kv_budget_bytes // kv_bytes)
    if kv_budget_tokens is None:
        kv_budget_tokens = default_budget_tokens(kv_bytes, max_sessions * seq_len, device)
    settings = Settings(token=token, api_keys=str(api_keys) if api_keys else None, max_sessions=max_sessions,
                        max_seq_len=max_seq_len, session_ttl=session_ttl, max_message_bytes=max_message_bytes,
                        kv_budget_tokens=kv_budget_tokens, max_all_logits=max_all_logits, client_quota=client_quota,
                        expose_timing=expose_timing, rekey_after=rekey_after)
    usage.where.update((bundle_id, str(path)) for (_, bundle_id), path in zip(engines, bundles))
    app = create_app(engines, settings, usage=usage)
    _log_start(app.state.contexts, settings, dtype, device, kv_bytes)
    _serve(app, host, port, log_level, ssl_certfile, ssl_keyfile)


def _load_engines(bundles: list, engine_kind: str, dtype: torch.dtype, device: str, trusted, capture,
                  capture_layers, **engine_kw) -> list[tuple[Engine, str]]:
    """One engine per bundle (one model in memory per context), with its bundle id; the first wrapped for
    `stip serve --capture` where asked (off by default, and then nothing is wrapped)."""
    from stip.server.engines import load_engine

    engines: list = []
    for path in bundles:
        e = load_engine(engine_kind, path, dtype=dtype, device=device, trusted=trusted, **engine_kw)
        engines.append((e, e.manifest.get("bundle_id", "")))
        seen = [b for _, b in engines[:-1]]
        if engines[-1][1] in seen:
            for e, _ in engines:
                e.close()
            raise StipError(f"{path} is bundle {engines[-1][1]}, given twice: each context needs its own bundle "
                            f"(`stip rekey` issues a new one)")
    if capture is not None:
        from stip.server.capture import enable_capture

        try:
            engines[0] = (enable_capture(engines[0][0], capture, capture_layers), engines[0][1])
        except BaseException:
            engines[0][0].close()
            raise
    return engines


def _log_start(contexts: Contexts, settings: Settings, dtype: str, device: str, kv_bytes: int) -> None:
    for service in contexts.services:
        engine = service.engine
        log.info("STIP server: %s model (d=%s, V=%d, %s on %s), bundle %s, max %d sessions, max_seq_len %d, "
                 "ttl %.0fs, torch threads %d", engine.model_type, getattr(engine, "hidden_size", "?"),
                 engine.vocab_size, dtype, device, service.bundle_id, settings.max_sessions, service.max_seq_len,
                 settings.session_ttl, torch.get_num_threads())
    if len(contexts) > 1:
        log.info("%d contexts side by side (one model each); requests name theirs in the %s header; sessions and "
                 "the KV budget are shared", len(contexts), wire.BUNDLE_HEADER)
    usage = contexts.first.usage
    if usage.rekey_after is not None or usage.usage_file is not None:
        log.info("rekey budget: %s tokens per context (--rekey-after); counts %s",
                 usage.rekey_after if usage.rekey_after is not None else "no limit,",
                 f"saved in {usage.usage_file}" if usage.usage_file else "kept for this process only")
    token, api_keys, budget = settings.token, settings.api_keys, settings.kv_budget_tokens
    log.info("KV budget %d tokens (%.1f MB at %d bytes/token); clients: %s", budget, budget * kv_bytes / 1e6,
             kv_bytes, "API key file" + (" and the token" if token else "") if api_keys else
             ("one token" if token else "anyone on loopback"))


def _serve(app, host: str, port: int, log_level: str, ssl_certfile: str | None, ssl_keyfile: str | None) -> None:
    """Run uvicorn until interrupted."""
    import uvicorn

    contexts: Contexts = app.state.contexts
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
        # Larger messages than our limit still reach the app (which answers 413 and keeps the socket); only
        # absurd ones are cut by the protocol layer (close 1009).
        ws_max_size=2 * contexts.max_message_bytes + HEADER_SLACK, ws_per_message_deflate=False,
        ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        raise StipError(f"the server could not start on {host}:{port} (is the port in use?)")
