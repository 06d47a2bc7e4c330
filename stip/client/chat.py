"""`stip chat`: a terminal chat with a protected model. Text stays here; the server sees permuted embeddings only."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console


def run_chat(bundle: Path, *, server: str, token: str | None = None, prompt: str | None = None,
             max_tokens: int = 256, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
             downlink: str = "topk", system: str | None = None, trusted=None, ca_file: Path | None = None,
             insecure: bool = False, images: list[Path] | None = None, allow_simulated: bool = False) -> None:
    """`images` (LLaVA-style bundles): files attached to the first message, as image content parts. A TEE client
    bundle (`stip protect --tee`) talks to the enclave at `server` instead (stip.client.tee)."""
    from stip.client.bundle import ClientBundle
    from stip.common.sampling import SamplingParams
    from stip.common.tasks import SESSION_TASKS
    from stip.client.sdk import Client
    from stip.errors import StipError

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, seed=seed, stop=list(stop or []))
    from stip.client.tee import TeeClient, is_tee_bundle

    tee = is_tee_bundle(bundle)
    if tee and images:
        raise StipError("TEE mode takes text only (--image is for round-trip LLaVA-style bundles)")
    loaded = TeeClient(bundle, server, allow_simulated=allow_simulated, trusted=trusted, token=token,
                       ca_file=ca_file, insecure=insecure) if tee else ClientBundle.load(bundle, trusted=trusted)
    if tee:
        client, loaded = loaded, loaded.bundle
    if loaded.task not in SESSION_TASKS:  # before any server contact: an encoder or classifier has no chat
        raise StipError(f"{bundle} is a {loaded.task} model, which does not generate text: `stip chat` needs a "
                        f"text-generation bundle (use `stip embed` or `stip classify`)")
    if images:  # checked and read before any server contact
        from stip.client.image_parts import require_vision
        from stip.common.tasks import IMAGE_TEXT_TO_TEXT

        if loaded.task != IMAGE_TEXT_TO_TEXT:
            raise StipError(f"{bundle} is a {loaded.task} model, which takes no images (--image)")
        require_vision("stip chat --image")
        from stip.client import vision

        parts = [vision.image_part(p) for p in images]
    if not tee:
        client = Client(loaded, server, token=token, downlink=downlink, trusted=trusted, ca_file=ca_file,
                        insecure=insecure)
    history: list[dict] = [{"role": "system", "content": system}] if system else []

    def answer(text: str) -> None:
        first = images and not any(m["role"] == "user" for m in history)
        history.append({"role": "user", "content": [*parts, {"type": "text", "text": text}] if first else text})
        stream = client.stream(messages=history, params=params)
        for delta in stream:
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        g = stream.generation
        history.append({"role": "assistant", "content": g.text})
        t = g.timing
        err.print(f"[dim]{len(g.token_ids)} tokens, {g.finish_reason}; {t.tokens_per_s:.1f} tok/s; per token: "
                  f"client {t.client_ms_per_token:.2f} ms, {t.breakdown()}, {t.bytes_sent_per_token:.0f} B up / "
                  f"{t.bytes_received_per_token:.0f} B down[/dim]")

    if prompt is not None:
        answer(prompt)
        return
    err.print(f"[bold]STIP chat[/bold] with {server} (bundle {client.bundle.bundle_id}). "
              "Empty line or /exit quits, /reset clears the history.")
    while True:
        try:
            text = Console(highlight=False).input("[bold green]you>[/bold green] ")
        except EOFError:
            break
        text = text.strip()
        if not text or text in ("/exit", "/quit"):
            break
        if text == "/reset":
            del history[1 if system else 0:]
            continue
        answer(text)
