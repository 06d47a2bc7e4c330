"""The `stip` command line. Each command is a thin wrapper over the Python API of one party's subpackage."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from stip.errors import StipError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="STIP: private inference on a protected Transformer, for three parties.")


TRUST_HELP = ("the developer's signing key to require, as `stip inspect` shows it (ed25519:FP); repeatable. "
              "Default: $STIP_TRUSTED_SIGNERS; without either the bundle's signature shows only self-consistency")


def _trust(values: list[str]) -> list[str] | None:
    """None when no --trust was given, so the loaders fall back to $STIP_TRUSTED_SIGNERS."""
    return list(values) or None


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("b")
    try:
        n = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise StipError(f"not a size: {text!r} (expected e.g. 4096, 16MB or 2GB)") from None
    if n < 1:
        raise StipError(f"a size must be positive, got {text!r}")
    return n


# ---------------------------------------------------------------- model developer


@app.command()
def protect(
    model: str = typer.Argument(..., help="Hugging Face model folder, a .gguf file, or a packaged model: "
                                "'smollm2', 'all-minilm-l6-v2'"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: gets server/, client/ and developer/"),
    key: Optional[Path] = typer.Option(None, help="reuse this developer key instead of drawing a fresh one"),
    signing_key: Optional[Path] = typer.Option(None, help="sign with this Ed25519 key (a developer/signing.key "
                                               "from an earlier run) instead of a new one, so users pin it once"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    shard_size: str = typer.Option("512MB", help="largest server shard (bounds memory)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    mode: str = typer.Option("round-trip", help="round-trip: clients embed and sample, the server gets no embedding "
                             "table; server-decode: the server bundle is a complete checkpoint in the permuted "
                             "vocabulary that samples by itself (docs/server-decode.md)"),
    tee: bool = typer.Option(False, "--tee", help="also write DIR/enclave/ (sealed) and the key-less "
                             "DIR/tee-client/ for TEE mode (docs/tee.md)"),
    platform_key: Optional[Path] = typer.Option(None, help="--tee: the (simulated) platform key file the enclave "
                                                "bundle is sealed for; created if absent (default "
                                                "DIR/tee-platform/platform.key)"),
    harden: str = typer.Option("", help="hardened modes, comma-separated: mix (dense orthogonal mixing of the "
                               "residual stream, norms folded), rope (Q/K in-head rotations), vo (V/O in-head mixing), "
                               "ffn (exact power-of-two FFN scalings), or all (docs/hardened.md)"),
    noise: float = typer.Option(0.0, help="the client adds Gaussian noise of NOISE times the embedding table's RMS "
                                "to every row it sends (lossy; e.g. 0.01; docs/hardened.md)"),
    attestation: str = typer.Option("simulated", help="--tee: the enclave report the TEE client accepts: simulated "
                                    "(pins the platform key) or nitro (AWS Nitro Enclaves: pins the image's PCRs)"),
    pcr0: Optional[str] = typer.Option(None, help="--attestation nitro: the enclave image's PCR0 (96 hex digits, "
                                       "from `nitro-cli build-enclave`); required, here or in --pcrs"),
    pcr1: Optional[str] = typer.Option(None, help="--attestation nitro: PCR1 (kernel and boot) to pin"),
    pcr2: Optional[str] = typer.Option(None, help="--attestation nitro: PCR2 (application) to pin"),
    pcr3: Optional[str] = typer.Option(None, help="--attestation nitro: PCR3 (parent instance's IAM role) to pin"),
    pcr4: Optional[str] = typer.Option(None, help="--attestation nitro: PCR4 (parent instance id) to pin"),
    pcr8: Optional[str] = typer.Option(None, help="--attestation nitro: PCR8 (image signing certificate) to pin"),
    pcrs: Optional[Path] = typer.Option(None, help="--attestation nitro: a JSON file of PCRs to pin, as "
                                        "`nitro-cli build-enclave` prints them ({\"Measurements\": {\"PCR0\": ...}})"),
):
    """Protect MODEL: a server bundle for the cloud, a client bundle for data owners, a developer key to keep."""
    from stip.developer.protect import MODES, protect as run_protect

    if mode not in MODES:
        raise typer.BadParameter(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}", param_hint="--mode")
    pinned = {0: pcr0, 1: pcr1, 2: pcr2, 3: pcr3, 4: pcr4, 8: pcr8}
    pinned_pcrs = None
    if attestation != "simulated" or pcrs is not None or any(v is not None for v in pinned.values()):
        from stip.developer.tee import check_attestation, nitro_pcrs

        if not tee:
            raise StipError("--attestation and the PCR options pin the TEE client's verifier: they need --tee")
        if attestation != "nitro":
            check_attestation(attestation, None)  # an unknown one is named
            raise StipError("--pcrN and --pcrs pin an AWS Nitro enclave image: they need --attestation nitro")
        pinned_pcrs = nitro_pcrs(pinned, pcrs)  # checked before the slow part
    from stip.models import resolve_model

    from stip.common.signing import pin

    r = run_protect(resolve_model(model), out, key=key, overwrite=overwrite, max_shard_bytes=_size(shard_size),
                    progress=not quiet, signing_key=signing_key, mode=mode, tee=tee, platform_key=platform_key,
                    harden=harden, noise=noise, attestation=attestation, pcrs=pinned_pcrs)
    hardened = f", harden {','.join(r.harden)}" if r.harden else ""
    hardened += f", noise {noise:g}" if noise else ""
    typer.echo(f"protected {model} -> {out} ({mode}{hardened})\n"
               f"  server bundle    {r.server}  ({r.server_bytes / 1e6:.1f} MB; give to the model server)\n"
               f"  client bundle    {r.client}  (client key {r.client_fingerprint}; give to data owners)\n"
               f"  developer key    {r.developer_key}  ({r.developer_fingerprint}; keep secret)\n"
               f"  signing key      {r.signing_key}  ({'new' if r.new_signing_key else 'reused'}; keep secret; "
               f"reuse with --signing-key)\n"
               f"  signer           {pin(r.signer)}  (publish it: users and servers pin it with --trust)\n"
               f"  bundle id        {r.bundle_id}")
    if r.tee:
        typer.echo(f"  enclave bundle   {r.out / 'enclave'}  (sealed; for `stip enclave` on the TEE host)\n"
                   f"  TEE client       {r.out / 'tee-client'}  (no key, no embedding; give to data owners)\n"
                   f"  measurement      {r.tee['measurement']}")
        if r.tee["attestation"] == "nitro":
            typer.echo(f"  attestation      AWS Nitro; the TEE client pins PCR{', PCR'.join(r.tee['pcrs'])}\n"
                       f"  sealed for       the SIMULATED platform {r.tee['platform_pin']} (docs/tee.md, Backends)")
        else:
            typer.echo(f"  platform key     {r.tee['platform_pin']}  (SIMULATED platform)")


@app.command()
def inspect(path: Path = typer.Argument(..., help="a bundle folder, a .stipkey file or a signing.key")):
    """Show what a bundle or key file is: role, bundle id, format version, fingerprint, and the signer's public key
    (compare it with the developer's out of band before pinning it with --trust)."""
    from stip.common.inspect import describe

    typer.echo(json.dumps(describe(path), indent=2))


@app.command()
def verify(
    bundle: Path = typer.Argument(..., help="a bundle folder"),
    key: Optional[Path] = typer.Option(None, help="also check that this key file belongs to the bundle"),
    trust: list[str] = typer.Option([], help=TRUST_HELP),
):
    """Check a bundle's signed manifest (signature, every file present, every sha256 matching) and, optionally, a
    key against it."""
    from stip.common.inspect import verify_bundle

    typer.echo(verify_bundle(bundle, key, trusted=_trust(trust)))


@app.command()
def rekey(
    model: str = typer.Argument(..., help="the model the old bundle was protected from (folder, .gguf or 'smollm2')"),
    from_dir: Path = typer.Option(..., "--from", help="the old protected folder (its developer/ gives the options "
                                  "and the signing key)"),
    out: Path = typer.Option(..., "--out", "-o", help="the new protected folder"),
    signing_key: Optional[Path] = typer.Option(None, help="sign with this key instead of the old folder's"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    trust: list[str] = typer.Option([], help=TRUST_HELP),
):
    """Issue a fresh key and bundle for MODEL with the old folder's options; serve both while clients move
    (docs/contexts.md)."""
    from stip.common.signing import pin
    from stip.developer.rekey import rekey as run_rekey
    from stip.models import resolve_model

    r = run_rekey(resolve_model(model), from_dir, out, overwrite=overwrite, progress=not quiet,
                  signing_key=signing_key, trusted=_trust(trust))
    typer.echo(f"rekeyed {model}: {from_dir} -> {out}\n"
               f"  server bundle    {r.server}  ({r.server_bytes / 1e6:.1f} MB)\n"
               f"  client bundle    {r.client}  (client key {r.client_fingerprint})\n"
               f"  developer key    {r.developer_key}  ({r.developer_fingerprint}; keep secret)\n"
               f"  signer           {pin(r.signer)}  ({'new' if r.new_signing_key else 'unchanged'})\n"
               f"  bundle id        {r.bundle_id}  (new)\n"
               f"serve both: stip serve {from_dir / 'server'} {r.server}")


# ---------------------------------------------------------------- model server


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
):
    """Serve a protected model: sessions send permuted embeddings and get permuted logits back."""
    from stip.server.app import run_server
    from stip.server.budget import Quota

    run_server(bundle, host=host, port=port, token=token, max_sessions=max_sessions, max_seq_len=max_seq_len,
               api_keys=api_keys, kv_budget_bytes=_size(kv_budget) if kv_budget else None,
               kv_budget_tokens=kv_budget_tokens, max_all_logits=max_all_logits,
               client_quota=Quota(client_max_sessions, client_max_tokens),
               session_ttl=session_ttl, max_message_bytes=_size(max_message_size) if max_message_size else None,
               threads=threads, log_level=log_level, ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
               ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None, dtype=dtype, device=device,
               trusted=_trust(trust), engine_kind=engine, prefill_chunk=prefill_chunk,
               batching=batching, tee_worker=tee_worker, capture=capture, capture_layers=capture_layers,
               expose_timing=expose_timing,
               vllm_options=_vllm_options(engine, vllm_arg, tensor_parallel_size=tensor_parallel_size,
                                          pipeline_parallel_size=pipeline_parallel_size, max_num_seqs=max_num_seqs,
                                          gpu_memory_utilization=gpu_memory_utilization))


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
    ssl_certfile: Optional[Path] = typer.Option(None, help="TLS certificate (serve https/wss)"),
    ssl_keyfile: Optional[Path] = typer.Option(None, help="TLS private key"),
    trust: list[str] = typer.Option([], help=TRUST_HELP),
    log_level: str = typer.Option("info", help="debug, info, warning or error"),
):
    """TEE mode: run the enclave (SIMULATED: an ordinary process): attests, holds the key and the first and last
    layers, serves TEE clients and drives the worker (docs/tee.md)."""
    from stip.enclave.admission import Limits, check_bind

    check_bind(host, token)  # before the slow imports
    from stip.enclave.process import run_enclave

    try:
        limits = Limits(max_sessions=max_sessions, client_max_pending=client_max_pending,
                        client_max_sessions=client_max_sessions or max(1, max_sessions // 4))
    except ValueError as e:
        raise StipError(str(e)) from None
    run_enclave(bundle, worker, host=host, port=port, platform_key=platform_key, worker_token=worker_token,
                trusted=_trust(trust), log_level=log_level, token=token, limits=limits,
                ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
                ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None)


def _vllm_options(engine: str, args: list[str], **flags) -> dict | None:
    """The vLLM engine arguments `stip serve` passes through; refused with any other engine."""
    from stip.server.vllm_engine import parse_vllm_arg

    options = dict(parse_vllm_arg(a) for a in args)
    options.update({k: v for k, v in flags.items() if v is not None})
    if options and engine != "vllm":
        names = ", ".join("--" + k.replace("_", "-") if k in flags else "--vllm-arg" for k in options)
        raise StipError(f"{names} apply to --engine vllm only (this server runs --engine {engine})")
    return options or None


apikey_app = typer.Typer(no_args_is_help=True, help="Manage a server's per-client API key file (hashes only).")
app.add_typer(apikey_app, name="apikey")


@apikey_app.command("create")
def apikey_create(
    file: Path = typer.Argument(..., help="the API key file (created if missing, owner-only)"),
    name: str = typer.Argument(..., help="the client's name (letters, digits, . _ - @; not token or anonymous)"),
    max_sessions: Optional[int] = typer.Option(None, help="sessions this client may hold at once"),
    max_tokens: Optional[int] = typer.Option(None, help="KV tokens this client's sessions may hold at once"),
    max_tokens_per_minute: Optional[int] = typer.Option(None, help="tokens this client may send per minute"),
    metrics: bool = typer.Option(False, help="may read /metrics (server-wide counts)"),
):
    """Add a client and print its new key, once: only its hash is stored."""
    from stip.server.auth import create_key

    key = create_key(file, name, max_sessions=max_sessions, max_tokens=max_tokens,
                     max_tokens_per_minute=max_tokens_per_minute, metrics=metrics)
    typer.echo(key)
    typer.echo(f"added client {name!r} to {file}; the key above is shown only now (the server keeps its hash)",
               err=True)


@apikey_app.command("revoke")
def apikey_revoke(file: Path = typer.Argument(...), name: str = typer.Argument(...)):
    """Revoke a client's key: within a second a running server refuses it, closes its sessions and cuts its streams."""
    from stip.server.auth import revoke_key

    revoke_key(file, name)
    typer.echo(f"revoked {name!r} in {file}")


@apikey_app.command("list")
def apikey_list(file: Path = typer.Argument(...)):
    """Clients, quotas and state (never keys or hashes)."""
    from stip.server.auth import list_keys

    typer.echo(json.dumps(list_keys(file), indent=2))


# ---------------------------------------------------------------- data owner


@app.command()
def chat(
    bundle: Path = typer.Argument(..., help="the client bundle folder"),
    server: str = typer.Option("http://127.0.0.1:8000", help="STIP server URL"),
    token: Optional[str] = typer.Option(None, envvar="STIP_TOKEN"),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="one message, then exit"),
    max_tokens: int = typer.Option(256),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_k: int = typer.Option(0),
    top_p: float = typer.Option(1.0),
    repetition_penalty: float = typer.Option(1.0),
    seed: Optional[int] = typer.Option(None),
    stop: list[str] = typer.Option([], help="stop string (repeatable)"),
    downlink: str = typer.Option("topk", help="'topk' (k pairs per token) or 'logits' (all V logits)"),
    system: Optional[str] = typer.Option(None, help="a system message to start the conversation with"),
    image: list[Path] = typer.Option([], help="an image file for the first message (LLaVA-style models; "
                                     "repeatable); the vision tower runs here"),
    trust: list[str] = typer.Option([], help=TRUST_HELP),
    ca_file: Optional[Path] = typer.Option(None, help="verify an https:// server against this CA certificate (PEM) "
                                           "only, instead of the system trust store"),
    insecure: bool = typer.Option(False, "--insecure", help="allow sending the token over plain http:// to a "
                                  "non-loopback host (certificates are still verified on https://)"),
    allow_simulated: bool = typer.Option(False, "--allow-simulated", help="TEE client bundles: accept a SIMULATED "
                                         "enclave's report (development only; docs/tee.md)"),
):
    """Chat with a protected model: tokenize, embed and permute locally; the server never sees text. With a TEE
    client bundle, --server is the enclave's URL."""
    from stip.client.chat import run_chat

    run_chat(bundle, server=server, token=token, prompt=prompt, max_tokens=max_tokens, temperature=temperature,
             top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop,
             downlink=downlink, system=system, trusted=_trust(trust), ca_file=ca_file, insecure=insecure,
             images=image, allow_simulated=allow_simulated)


def _one_shot_client(bundle: Path, task: str, doing: str, server: str, token, trust, ca_file, insecure):
    """A client for a one-shot bundle of `task`; a bundle of another task is refused before contacting the server."""
    from stip.client.bundle import ClientBundle
    from stip.client.sdk import Client

    loaded = ClientBundle.load(bundle, trusted=_trust(trust))
    if loaded.task != task:
        raise StipError(f"{bundle} holds a {loaded.task} model; {doing} needs a model for {task}")
    return Client(loaded, server, token=token, trusted=_trust(trust), ca_file=ca_file, insecure=insecure)


@app.command()
def embed(
    texts: list[str] = typer.Argument(..., help="the texts to embed"),
    client: Path = typer.Option(..., "--client", help="the client bundle folder (a feature-extraction model)"),
    server: str = typer.Option("http://127.0.0.1:8000", help="STIP server URL"),
    token: Optional[str] = typer.Option(None, envvar="STIP_TOKEN"),
    trust: list[str] = typer.Option([], help=TRUST_HELP),
    ca_file: Optional[Path] = typer.Option(None, help="verify an https:// server against this CA certificate only"),
    insecure: bool = typer.Option(False, "--insecure", help="allow the token over plain http:// to a non-loopback "
                                  "host"),
):
    """Sentence embeddings of TEXTS from a protected encoder: prints a JSON list, one vector per text."""
    from stip.common.tasks import FEATURE_EXTRACTION

    c = _one_shot_client(client, FEATURE_EXTRACTION, "`stip embed`", server, token, trust, ca_file, insecure)
    typer.echo(json.dumps(c.embed(list(texts)).tolist()))


@app.command()
def classify(
    texts: list[str] = typer.Argument(None, help="the texts to classify (or --image)"),
    client: Path = typer.Option(..., "--client", help="the client bundle folder (a classifier)"),
    image: list[Path] = typer.Option([], "--image", help="an image file to classify (repeatable)"),
    top_k: int = typer.Option(1, help="labels per input"),
    server: str = typer.Option("http://127.0.0.1:8000", help="STIP server URL"),
    token: Optional[str] = typer.Option(None, envvar="STIP_TOKEN"),
    trust: list[str] = typer.Option([], help=TRUST_HELP),
    ca_file: Optional[Path] = typer.Option(None, help="verify an https:// server against this CA certificate only"),
    insecure: bool = typer.Option(False, "--insecure", help="allow the token over plain http:// to a non-loopback "
                                  "host"),
):
    """Classify TEXTS (or --image files) with a protected classifier: prints JSON, per input its labels and
    scores."""
    from stip.common.tasks import IMAGE_CLASSIFICATION, TEXT_CLASSIFICATION

    if bool(texts) == bool(image):
        raise StipError("give texts or --image files to classify, one of them")
    for path in image:
        if not path.is_file():
            raise StipError(f"image file {path} does not exist")
    wanted = IMAGE_CLASSIFICATION if image else TEXT_CLASSIFICATION
    c = _one_shot_client(client, wanted, f"classifying {'images' if image else 'texts'}", server, token, trust,
                         ca_file, insecure)
    if image:
        result = c.classify(images=[str(p) for p in image], top_k=top_k)
    else:
        result = c.classify(list(texts), top_k=top_k)
    typer.echo(json.dumps(result))


@app.command()
def proxy(
    bundle: Path = typer.Argument(..., help="the client bundle folder"),
    server: str = typer.Option("http://127.0.0.1:8000", help="STIP server URL"),
    port: int = typer.Option(8080),
    host: str = typer.Option("127.0.0.1", help="address to bind; anything but loopback needs --api-key and TLS"),
    token: Optional[str] = typer.Option(None, envvar="STIP_TOKEN", help="the STIP server's token"),
    api_key: Optional[str] = typer.Option(None, envvar="STIP_PROXY_API_KEY",
                                          help="the proxy's own key: /v1 requests must send it as a bearer token "
                                          "(the OpenAI client's api_key)"),
    downlink: str = typer.Option("topk", help="'topk' (k pairs per token) or 'logits' (all V logits)"),
    k: int = typer.Option(64, help="pairs per token on the top-k downlink (also the most top_logprobs served)"),
    model_name: Optional[str] = typer.Option(None, help="the model id /v1/models lists (default stip-<type>)"),
    ca_file: Optional[Path] = typer.Option(None, help="verify an https:// server against this CA certificate (PEM) "
                                           "only, instead of the system trust store"),
    insecure: bool = typer.Option(False, "--insecure", help="allow sending the token over plain http:// to a "
                                  "non-loopback host (certificates are still verified on https://)"),
    trust: list[str] = typer.Option([], help=TRUST_HELP),
    allow_simulated: bool = typer.Option(False, "--allow-simulated", help="TEE client bundles: accept a SIMULATED "
                                         "enclave's report (development only; docs/tee.md)"),
    ssl_certfile: Optional[Path] = typer.Option(None, help="TLS certificate: the proxy serves https (required "
                                                "with --api-key off loopback)"),
    ssl_keyfile: Optional[Path] = typer.Option(None, help="TLS private key"),
    allowed_host: list[str] = typer.Option([], help="without --api-key: a host name of yours for this machine "
                                           "that requests may name in their Host header besides localhost, "
                                           "127.0.0.1 and [::1] (repeatable; others are refused: DNS rebinding)"),
):
    """An OpenAI-compatible endpoint on localhost that talks STIP to the server (a TEE client bundle: to the
    enclave at --server)."""
    from stip.client.proxy import run_proxy

    run_proxy(bundle, server=server, host=host, port=port, token=token, downlink=downlink, k=k,
              model_name=model_name, trusted=_trust(trust), api_key=api_key, ca_file=ca_file, insecure=insecure,
              allow_simulated=allow_simulated, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
              allowed_hosts=allowed_host)


# ---------------------------------------------------------------- all three


@app.command()
def demo(
    prompt: str = typer.Option("What is the capital of France? Answer in one sentence.", "--prompt", "-p"),
    max_tokens: int = typer.Option(48),
    cache: Path = typer.Option(Path.home() / ".cache" / "stip", help="where the protected default model is kept"),
):
    """All three parties on this machine, on the default model (SmolLM2-135M-Instruct)."""
    from stip.demo import run_demo

    ok = run_demo(prompt=prompt, max_tokens=max_tokens, cache=cache)
    raise typer.Exit(0 if ok else 1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    quick: bool = typer.Option(False, help="a small smoke run (CI)"),
    out: Path = typer.Option(Path("bench/results"), help="where results.md, results.json and plots go"),
    part: Optional[list[str]] = typer.Option(None, "--part", help="run only this part (repeat it): server_cost, "
                                             "concurrent, end_to_end, protect, mpc, scale (the full run leaves "
                                             "out concurrent: scale covers it)"),
):
    """Measure STIP against the plain model and against secure two-party computation: runs `python -m bench` in
    this git checkout (the suite lives in its bench/ folder); other options (the scale part's) pass through."""
    from stip.bench import run_bench

    args = [*(["--quick"] if quick else []), "--out", str(out), *[a for p in part or [] for a in ("--part", p)]]
    rc = run_bench([*args, *ctx.args])
    if rc:
        sys.exit(rc)


# ---------------------------------------------------------------- auditor


@app.command()
def audit(
    bundle: Path = typer.Argument(..., help="the folder `stip protect MODEL --out DIR` wrote (server/, client/)"),
    out: Path = typer.Option(..., "--out", "-o", help="report folder: report.md, report.json, plots"),
    reference: Optional[str] = typer.Option(None, help="the public weights the attacker holds: smollm2 or a Hugging "
                                            "Face folder (default: none; attacks that need them are skipped)"),
    attacks: Optional[str] = typer.Option(None, help="comma-separated attacks to run (default: all)"),
    prompts: Optional[int] = typer.Option(None, help="requests to send (default 16; --quick 4)"),
    prompt_tokens: Optional[int] = typer.Option(None, help="tokens per request (default 32; --quick 16)"),
    capture_layers: Optional[str] = typer.Option(None, help="decoder layers whose output the server records "
                                                 "(default: first, middle, last)"),
    quick: bool = typer.Option(False, help="small budgets (a smoke run)"),
    force: bool = typer.Option(False, help="replace a non-empty report folder"),
    keep_capture: bool = typer.Option(False, help="also keep the raw capture in OUT/capture"),
    seed: int = typer.Option(0),
):
    """Attack a protected model the way its server could, and report what each attack recovers (docs/audit.md)."""
    from stip.audit.report import fmt_recovery, status
    from stip.audit.run import run_audit

    report = run_audit(bundle, out, reference=reference, attacks=attacks, prompts=prompts,
                       prompt_tokens=prompt_tokens, capture_layers=capture_layers, quick=quick, force=force,
                       keep_capture=keep_capture, seed=seed)
    typer.echo(f"audit of {bundle} (mode {report['mode']}), {report['seconds']:.0f} s:")
    for a in report["attacks"]:
        typer.echo(f"  {a['name']:<22} {fmt_recovery(a):>8}  {a.get('unit', '')}  {status(a)}")
    typer.echo(f"report: {out / 'report.md'}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        app(standalone_mode=False)
    except StipError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors carry their own exit codes
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
