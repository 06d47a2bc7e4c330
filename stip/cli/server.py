"""The model server's commands: serve a protected model, and run the enclave in TEE mode."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stip.cli.app import app
from stip.cli.options import TRUST_HELP, parse_count, parse_size, trusted_signers
from stip.errors import StipError


@app.command()
def serve(
    bundle: list[Path] = typer.Argument(..., help="the server bundle folder; several serve side by side, one context "
                                        "(key) each, routed by bundle id (docs/contexts.md)"),
    host: str = typer.Option("127.0.0.1", help="address to bind; anything but loopback needs a token"),
    port: int = typer.Option(8000),
    token: Optional[str] = typer.Option(None, envvar="STIP_TOKEN", help="bearer token clients must present"),
    api_keys: Optional[Path] = typer.Option(None, help="per-client API key file (`stip apikey create`); re-read "
                                            "when it changes, so revocation needs no restart"),
    max_sessions: int = typer.Option(64, help="open sessions (KV caches) at most; more get 503"),
    max_seq_len: int = typer.Option(4096, help="tokens per session at most (capped by the model's own limit)"),
    kv_budget: Optional[str] = typer.Option(None, help="memory for all KV caches together, e.g. 2GB (default: half "
                                            "the memory available after loading the model)"),
    kv_budget_tokens: Optional[int] = typer.Option(None, help="the KV budget in tokens (overrides --kv-budget)"),
    max_all_logits: int = typer.Option(1 << 24, help="T x V logits one positions='all' prefill may compute"),
    client_max_sessions: Optional[int] = typer.Option(None, help="sessions per client (the token, and keys that "
                                                      "set no quota; keys default to 1/4 of --max-sessions)"),
    client_max_tokens: Optional[int] = typer.Option(None, help="KV tokens held per client (likewise; keys "
                                                    "default to 1/4 of the KV budget)"),
    session_ttl: float = typer.Option(300.0, help="seconds an idle session keeps its KV cache"),
    max_message_size: Optional[str] = typer.Option(None, help="largest request frame, e.g. 16MB "
                                                   "(default: room for max_seq_len float32 embeddings)"),
    threads: Optional[int] = typer.Option(None, help="torch threads for the model (default: torch's choice)"),
    dtype: str = typer.Option("float32", help="model weights dtype: float32, bfloat16 or float16"),
    device: str = typer.Option("cpu", help="torch device for the model, e.g. cpu or cuda"),
    log_level: str = typer.Option("info", help="debug, info, warning or error"),
    ssl_certfile: Optional[Path] = typer.Option(None, help="TLS certificate (serve https/wss)"),
    ssl_keyfile: Optional[Path] = typer.Option(None, help="TLS private key"),
    trust: list[str] = typer.Option([], help=TRUST_HELP),
    engine: str = typer.Option("transformers", help="transformers: our own engine on the stock model; vllm: the "
                               "bundle on vLLM (needs the vllm extra, docs/scale.md)"),
    batching: bool = typer.Option(True, help="transformers engine: merge concurrent sessions' steps into one "
                                  "forward per tick (continuous batching, docs/batching.md); off: one forward per step"),
    prefill_chunk: int = typer.Option(256, help="batched engine: prompt tokens per tick at most, so a long prompt "
                                      "cannot stall other sessions' decodes"),
    tensor_parallel_size: Optional[int] = typer.Option(None, help="vllm engine: GPUs to split each layer over"),
    pipeline_parallel_size: Optional[int] = typer.Option(None, help="vllm engine: GPUs (or nodes) to split the "
                                                         "layers over"),
    max_num_seqs: Optional[int] = typer.Option(None, help="vllm engine: sequences in one batch at most"),
    gpu_memory_utilization: Optional[float] = typer.Option(None, help="vllm engine: fraction of GPU memory for "
                                                           "weights and KV cache (vLLM's default 0.9)"),
    vllm_arg: list[str] = typer.Option([], help="vllm engine: any other vLLM engine argument, KEY=VALUE "
                                       "(e.g. max_model_len=2048); repeatable"),
    tee_worker: bool = typer.Option(False, "--tee-worker", help="TEE mode: serve the enclave's WebSocket "
                                    "(block 0's padded linears in secret bases, an untied LM head, blocks 1..L-1) "
                                    "instead of client sessions; needs a bundle from `stip protect --tee` "
                                    "(docs/tee.md)"),
    capture: Optional[Path] = typer.Option(None, help="AUDIT ONLY: write every input row the server receives, and "
                                           "hidden states, to this new folder for `stip audit` (docs/audit.md)"),
    capture_layers: Optional[str] = typer.Option(None, help="with --capture: decoder layers whose output to record, "
                                                 "e.g. 0,15,29 (default: first, middle, last)"),
    expose_timing: bool = typer.Option(False, "--expose-timing", help="send clients each step's server compute "
                                       "time (server_ms). Off by default: per-step times let a key holder probe "
                                       "what other clients' requests left in shared caches"),
    rekey_after: Optional[str] = typer.Option(None, help="tokens each context's key may serve (e.g. 1M, 250k, 1e6): "
                                              "a warning at 80%, then new sessions on it are refused (403) until "
                                              "`stip rekey` (docs/contexts.md)"),
    usage_file: Optional[Path] = typer.Option(None, help="keep each context's served-token count in this file "
                                              "across restarts (default: counted for this process only)"),
):
    """Serve a protected model: sessions send permuted embeddings and get permuted logits back."""
    from stip.server.budget import Quota

    kw = dict(host=host, port=port, token=token, max_sessions=max_sessions, max_seq_len=max_seq_len,
              api_keys=api_keys, kv_budget_bytes=parse_size(kv_budget) if kv_budget else None,
              kv_budget_tokens=kv_budget_tokens, max_all_logits=max_all_logits,
              client_quota=Quota(client_max_sessions, client_max_tokens),
              session_ttl=session_ttl, max_message_bytes=parse_size(max_message_size) if max_message_size else None,
              threads=threads, log_level=log_level, ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
              ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None, dtype=dtype, device=device,
              trusted=trusted_signers(trust), engine_kind=engine, prefill_chunk=prefill_chunk,
              batching=batching, tee_worker=tee_worker, capture=capture, capture_layers=capture_layers,
              expose_timing=expose_timing, usage_file=usage_file,
              rekey_after=parse_count(rekey_after, "--rekey-after") if rekey_after is not None else None,
              vllm_options=_vllm_options(engine, vllm_arg, tensor_parallel_size=tensor_parallel_size,
                                         pipeline_parallel_size=pipeline_parallel_size, max_num_seqs=max_num_seqs,
                                         gpu_memory_utilization=gpu_memory_utilization))
    _preflight(bundle, kw)
    from stip.server.app import run_server

    run_server(bundle, **kw)


def _preflight(bundle: list[Path], kw: dict) -> None:
    """run_server's refusals before its imports (torch, FastAPI: seconds), so a refused option or bundle answers at
    once; run_server checks again, and warns."""
    from stip.server.serve_checks import preflight, serve_limits

    limits = serve_limits(*(kw[k] for k in ("max_sessions", "max_seq_len", "kv_budget_bytes", "kv_budget_tokens",
                                            "max_all_logits")))
    preflight(bundle, limits=limits, warn=False, **{k: kw[k] for k in (
        "host", "token", "api_keys", "ssl_certfile", "dtype", "session_ttl", "engine_kind", "tee_worker", "capture",
        "capture_layers", "rekey_after", "usage_file", "vllm_options")})
    for folder in bundle:
        _check_bundle(folder, "server", kw["trusted"])


def _check_bundle(folder: Path, role: str, trusted) -> None:
    """What the party checks of its bundle at load that costs no hashing: the signed manifest (format, signature
    against the pinned signers, role) and no unlisted file; the files' sha256s are checked as it loads."""
    from stip.common.bundles.manifest import check_no_unlisted, read_manifest

    manifest = read_manifest(folder, role=role, verify=False, trusted=trusted, warn_unpinned=False)
    check_no_unlisted(folder, manifest["files"])


@app.command()
def enclave(
    bundle: Path = typer.Argument(..., help="the enclave bundle folder (DIR/enclave from `stip protect --tee`)"),
    worker: str = typer.Option(..., help="URL of the GPU worker (`stip serve DIR/server --tee-worker`)"),
    host: str = typer.Option("127.0.0.1", help="address to bind; anything but loopback needs a token"),
    port: int = typer.Option(8100),
    platform_key: Optional[Path] = typer.Option(None, help="the simulated platform's key file (default "
                                                "DIR/tee-platform/platform.key)"),
    worker_token: Optional[str] = typer.Option(None, envvar="STIP_WORKER_TOKEN", help="the worker's bearer token"),
    token: Optional[str] = typer.Option(None, envvar="STIP_TOKEN", help="bearer token TEE clients must send "
                                        "(required off loopback)"),
    max_sessions: int = typer.Option(64, help="open client sessions at most; more get 503"),
    client_max_sessions: Optional[int] = typer.Option(None, help="open sessions per client (token holder and "
                                                      "peer address; default 1/4 of --max-sessions); more get 429"),
    client_max_pending: int = typer.Option(16, help="attestations per client waiting for their session; more get "
                                           "429"),
    max_batch: int = typer.Option(16, help="sessions' steps run together as one batched step at most"),
    pad_pool_mib: int = typer.Option(256, help="memory for precomputed pads and their products (0: compute them "
                                     "inline, on every step's critical path)"),
    ssl_certfile: Optional[Path] = typer.Option(None, help="TLS certificate (serve https/wss)"),
    ssl_keyfile: Optional[Path] = typer.Option(None, help="TLS private key"),
    trust: list[str] = typer.Option([], help=TRUST_HELP),
    log_level: str = typer.Option("info", help="debug, info, warning or error"),
):
    """TEE mode: run the enclave (SIMULATED: an ordinary process): attests, holds the key and the first and last
    layers, serves TEE clients and drives the worker (docs/tee.md)."""
    from stip.enclave.admission import Limits, check_bind

    check_bind(host, token)  # before the slow imports
    _check_bundle(bundle, "enclave", trusted_signers(trust))
    from stip.enclave.process import run_enclave

    try:
        limits = Limits(max_sessions=max_sessions, client_max_pending=client_max_pending,
                        client_max_sessions=client_max_sessions or max(1, max_sessions // 4))
    except ValueError as e:
        raise StipError(str(e)) from None
    if pad_pool_mib < 0 or max_batch < 1:
        raise StipError("--pad-pool-mib must be 0 or more and --max-batch at least 1")
    run_enclave(bundle, worker, pad_pool_bytes=pad_pool_mib << 20, max_batch=max_batch, host=host, port=port,
                platform_key=platform_key, worker_token=worker_token,
                trusted=trusted_signers(trust), log_level=log_level, token=token, limits=limits,
                ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
                ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None)


def _vllm_options(engine: str, args: list[str], **flags) -> dict | None:
    """The vLLM engine arguments `stip serve` passes through; refused with any other engine."""
    from stip.server.vllm_options import parse_vllm_arg

    options = dict(parse_vllm_arg(a) for a in args)
    options.update({k: v for k, v in flags.items() if v is not None})
    if options and engine != "vllm":
        names = ", ".join("--" + k.replace("_", "-") if k in flags else "--vllm-arg" for k in options)
        raise StipError(f"{names} apply to --engine vllm only (this server runs --engine {engine})")
    return options or None
