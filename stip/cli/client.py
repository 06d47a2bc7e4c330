"""The data owner's commands: chat, embed, classify, and the OpenAI-compatible proxy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from stip.cli.app import app
from stip.cli.options import TRUST_HELP, trusted_signers
from stip.errors import StipError


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
             downlink=downlink, system=system, trusted=trusted_signers(trust), ca_file=ca_file, insecure=insecure,
             images=image, allow_simulated=allow_simulated)


def _one_shot_client(bundle: Path, task: str, doing: str, server: str, token, trust, ca_file, insecure):
    """A client for a one-shot bundle of `task`; a bundle of another task is refused before contacting the server."""
    from stip.client.bundle import ClientBundle
    from stip.client.sdk import Client

    loaded = ClientBundle.load(bundle, trusted=trusted_signers(trust))
    if loaded.task != task:
        raise StipError(f"{bundle} holds a {loaded.task} model; {doing} needs a model for {task}")
    return Client(loaded, server, token=token, trusted=trusted_signers(trust), ca_file=ca_file, insecure=insecure)


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
    cors_origin: list[str] = typer.Option([], help="a web origin (scheme://host[:port]) whose pages may call the "
                                          "proxy from a browser (CORS; repeatable; none by default; '*' needs "
                                          "--api-key)"),
):
    """An OpenAI-compatible endpoint on localhost that talks STIP to the server (a TEE client bundle: to the
    enclave at --server)."""
    from stip.client.proxy import run_proxy

    run_proxy(bundle, server=server, host=host, port=port, token=token, downlink=downlink, k=k,
              model_name=model_name, trusted=trusted_signers(trust), api_key=api_key, ca_file=ca_file, insecure=insecure,
              allow_simulated=allow_simulated, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
              allowed_hosts=allowed_host, cors_origins=cors_origin)
