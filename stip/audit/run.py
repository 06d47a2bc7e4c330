"""`stip audit`: capture what a real server receives, run every attack on it, write the report.

    from stip.audit.run import run_audit
    report = run_audit("protected/", "audit-report/", reference="smollm2")

The driver plays both sides. As the users, it sends N prompts of public English text (`stip.audit.corpus`'s
`prompts` part, K tokens each, one request each, prefill plus `generate` decode steps) through the real client SDK
to a real `stip serve DIR/server --capture` process on loopback. As the attacker, it reads back what that process
recorded and runs the attacks (`stip.audit.attacks`) with the server bundle, the public text and, if given, the
public weights. As the auditor, it alone knows the token ids it sent and the keys, and scores with them.
Defaults are sized so that every attack on SmolLM2 fits in 15 minutes on a 2-core CPU; `quick` is for tests.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from stip.audit.attacks import ATTACKS, load
from stip.audit.attacks.base import AttackResult
from stip.audit.capture import read_capture
from stip.audit.context import AuditContext, Truth
from stip.errors import StipError

log = logging.getLogger("stip.audit")

# Sizes: full runs (SmolLM2 within 15 minutes on 2 cores, all attacks) and quick ones (tests, smoke runs).
DEFAULTS = {"prompts": 16, "prompt_tokens": 32, "generate": 1, "public_tokens": 300_000, "heldout_tokens": 4000,
            "attack_budget_s": 150.0}
QUICK = {"prompts": 4, "prompt_tokens": 16, "generate": 1, "public_tokens": 20_000, "heldout_tokens": 1000,
         "attack_budget_s": 60.0}


class CharTokenizer:
    """For bundles shipped without a tokenizer (tiny test models): one id per character, its code mod the
    vocabulary, so the corpus still gives real English statistics."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) % self.vocab_size for c in text]}

    def decode(self, ids) -> str:
        return "".join(chr(int(i)) for i in ids)


def check_bundle(bundle_dir: str | Path) -> Path:
    """A protected output folder with server/ and client/ (round-trip mode); a StipError names what is wrong."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.exists():
        raise StipError(f"{bundle_dir} does not exist; give the folder `stip protect MODEL --out DIR` wrote")
    if not bundle_dir.is_dir():
        raise StipError(f"{bundle_dir} is not a folder; give the folder `stip protect MODEL --out DIR` wrote")
    for part in ("server", "client"):
        if not (bundle_dir / part / "stip-manifest.json").is_file():
            raise StipError(f"{bundle_dir} has no {part} bundle ({part}/stip-manifest.json); give the whole folder "
                            f"`stip protect MODEL --out DIR` wrote (the audit plays the users and the server)")
    manifest = json.loads((bundle_dir / "server" / "stip-manifest.json").read_text())
    if manifest.get("mode", "round-trip") != "round-trip":
        raise StipError(f"{bundle_dir} is a {manifest.get('mode')} bundle; `stip audit` attacks round-trip "
                        f"bundles (the server then sees embeddings, which it records)")
    return bundle_dir


def check_out_dir(out_dir: str | Path, force: bool) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise StipError(f"report folder {out_dir} exists and is not empty; pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise StipError(f"report folder {out_dir} is a file")
    return out_dir


def mode_name(bundle_dir: Path) -> tuple[str, dict]:
    """("paper" or e.g. "mix+rope+noise=0.01", the options) from the server bundle's manifest."""
    manifest = json.loads((Path(bundle_dir) / "server" / "stip-manifest.json").read_text())
    harden = list(manifest.get("harden") or [])
    noise = float(manifest.get("noise") or 0.0)
    parts = harden + ([f"noise={noise:g}"] if noise else [])
    return ("+".join(parts) if parts else "paper"), {"harden": harden, "noise": noise}


def load_reference(reference: str | Path | torch.nn.Module | None):
    """(model, tokenizer) of the public weights: None, a packaged name (smollm2), a local HF folder, or a model."""
    if reference is None:
        return None, None
    if isinstance(reference, torch.nn.Module):
        return reference.eval(), None
    from stip.models import load_plain_model, resolve_model

    path = resolve_model(reference)
    if not Path(path).exists():
        raise StipError(f"reference {reference!r}: no such model folder or packaged model (try smollm2)")
    try:
        model, tok = load_plain_model(reference)
    except (OSError, ValueError) as e:
        raise StipError(f"reference {reference!r} could not be loaded as a transformers causal LM: {e}") from None
    return model.eval(), tok  # load_plain_model loads float32 (GGUF models refuse .float())


def prompt_ids(tokenizer, n: int, k: int) -> list[list[int]]:
    """N prompts of K tokens: the `prompts` part's paragraphs, each cut to K tokens (shorter ones skipped)."""
    from stip.audit.corpus import split

    out = []
    for para in split()["prompts"]:
        ids = list(tokenizer(para, add_special_tokens=False)["input_ids"])
        if len(ids) >= k:
            out.append(ids[:k])
        if len(out) == n:
            return out
    raise StipError(f"the corpus has only {len(out)} prompts of {k} tokens; ask for fewer or shorter ones")


def capture_traffic(bundle_dir: Path, capture_dir: Path, prompts: list[list[int]], generate: int,
                    capture_layers: str | None, threads: int | None = None, while_serving=None) -> list[list[int]]:
    """Run a real `stip serve DIR/server --capture` and send each prompt through `stip.Client` (greedy, prefill plus
    `generate` decode steps, one session each). Returns each session's context: prompt ids + generated ids.
    `while_serving(url, token)` runs after those requests on the same server (its sessions are not audited)."""
    from stip.client.sdk import Client
    from stip.server.launch import local_server

    token = secrets.token_urlsafe(16)
    args = ["--capture", str(capture_dir)]
    if capture_layers:
        args += ["--capture-layers", str(capture_layers)]
    if threads:
        args += ["--threads", str(threads)]
    contexts = []
    with local_server(bundle_dir / "server", *args, token=token) as server:
        client = Client(bundle_dir / "client", server.url, token=token)
        for ids in prompts:
            gen = client.generate(ids=ids, max_tokens=generate + 1, temperature=0.0)
            contexts.append(list(ids) + list(gen.token_ids))
        if while_serving is not None:
            while_serving(server.url, token)
    return contexts


def truth_ids(observations, contexts: list[list[int]]) -> list[torch.Tensor]:
    """Per observation, the token ids of its rows: its session's context from `start`, `rows` long."""
    sessions = sorted({int(o.meta["session"]) for o in observations})
    if len(sessions) != len(contexts):
        raise StipError(f"the capture holds {len(sessions)} sessions for {len(contexts)} requests sent")
    order = {s: i for i, s in enumerate(sessions)}  # requests were sent one after another: sessions in order
    out = []
    for o in observations:
        ctx = contexts[order[int(o.meta["session"])]]
        start, rows = int(o.meta["start"]), int(o.inputs.shape[0])
        out.append(torch.tensor(ctx[start:start + rows], dtype=torch.int64))
    return out


def run_attack(name: str, ctx: AuditContext, budget_s: float | None = None) -> AttackResult:
    """One attack; a missing module is "not implemented", an exception is reported as an error, never raised."""
    t0 = time.perf_counter()
    try:
        module = load(name)
    except ModuleNotFoundError as e:
        if e.name == f"stip.audit.attacks.{name}":
            return AttackResult(name, name, None, skipped="not implemented")
        return AttackResult(name, name, None, skipped=f"error: {type(e).__name__}: {e}",
                            seconds=time.perf_counter() - t0)
    title = getattr(module, "TITLE", name)
    try:
        result = module.run(ctx)
    except Exception as e:  # noqa: BLE001 - one attack's failure must not stop the audit
        log.error("attack %s failed: %s", name, e)
        return AttackResult(name, title, None, skipped=f"error: {type(e).__name__}: {e}",
                            details={"traceback": traceback.format_exc(limit=6)[-3000:]},
                            seconds=time.perf_counter() - t0)
    if not isinstance(result, AttackResult):
        return AttackResult(name, title, None, skipped=f"error: run() returned {type(result).__name__}",
                            seconds=time.perf_counter() - t0)
    result.seconds = result.seconds or time.perf_counter() - t0
    if budget_s and result.seconds > budget_s:
        result.details = {**result.details, "over_budget": f"took {result.seconds:.0f} s, budget {budget_s:.0f} s"}
    return result


def run_audit(bundle_dir: str | Path, out_dir: str | Path, reference: str | Path | torch.nn.Module | None = None,
              attacks: list[str] | tuple[str, ...] | str | None = None, prompts: int | None = None,
              prompt_tokens: int | None = None, capture_layers: str | list[int] | None = None,
              settings: dict[str, Any] | None = None, seed: int = 0, quick: bool = False, force: bool = False,
              keep_capture: bool = False, generate: int | None = None, threads: int | None = None,
              while_serving=None) -> dict:
    """Audit the protected folder `bundle_dir` (server/, client/, developer/) and write the report to `out_dir`
    (report.json, report.md, plots; with `keep_capture` also the raw capture). Returns the report's dict.

    `reference`: the public weights the attacker holds (a packaged name such as "smollm2", a local HF folder, a
    loaded model, or None: attacks that need weights are skipped). `attacks`: names from `ATTACKS` (default all).
    `settings`: per-attack knobs ({"vocab_matching": {...}}) and sizes (see DEFAULTS); `quick`: small budgets.
    `while_serving(url, token)`: more work on the same real server after the audit's requests (the table command
    measures accuracy there); the sessions it opens are left out of the audit."""
    t_start = time.perf_counter()
    bundle_dir = check_bundle(bundle_dir)
    out_dir = check_out_dir(out_dir, force)
    names = _attack_names(attacks)
    sizes = _sizes(quick, settings, prompts, prompt_tokens, generate)
    if isinstance(capture_layers, (list, tuple)):
        capture_layers = ",".join(str(int(x)) for x in capture_layers)

    from stip.client.bundle import ClientBundle

    client = ClientBundle.load(bundle_dir / "client")
    tokenizer = client.tokenizer if client.has_tokenizer else CharTokenizer(client.vocab_size)
    model, ref_tok = load_reference(reference)
    if model is not None and int(model.get_input_embeddings().weight.shape[0]) != client.vocab_size:
        raise StipError(f"reference {reference!r} has a vocabulary of {model.get_input_embeddings().weight.shape[0]}"
                        f" tokens; the protected model has {client.vocab_size}: not its public weights")
    requests = prompt_ids(tokenizer, sizes["prompts"], sizes["prompt_tokens"])

    from stip.audit.corpus import token_ids

    with tempfile.TemporaryDirectory(prefix="stip-audit-") as tmp:
        capture_dir = Path(tmp) / "capture"
        t0 = time.perf_counter()
        log.info("audit: sending %d prompts of %d tokens to a capturing server", len(requests), sizes["prompt_tokens"])
        contexts = capture_traffic(bundle_dir, capture_dir, requests, sizes["generate"], capture_layers, threads,
                                   while_serving)
        # sessions are numbered in order of arrival, and the audit's requests came first, one after another
        observations = [o for o in read_capture(capture_dir) if int(o.meta["session"]) < len(contexts)]
        capture_s = time.perf_counter() - t0
        truth = Truth(truth_ids(observations, contexts), bundle_dir)
        ctx = AuditContext(
            server_dir=bundle_dir / "server", observations=observations, truth=truth, tokenizer=tokenizer,
            reference=model, public_ids=token_ids(tokenizer, "public", sizes["public_tokens"]),
            heldout_ids=token_ids(tokenizer, "heldout", sizes["heldout_tokens"]),
            settings={"quick": quick, **(settings or {})}, seed=seed)
        results = _run_attacks(names, ctx, seed, sizes["attack_budget_s"])
        traffic = {"prompts": len(requests), "prompt_tokens": sizes["prompt_tokens"],
                   "decode_steps": sizes["generate"], "observations": len(observations),
                   "rows": sum(int(o.inputs.shape[0]) for o in observations),
                   "capture_layers": sorted({layer for o in observations for layer in o.hidden}),
                   "seconds": round(capture_s, 2)}
        report = _report(bundle_dir, reference, client.bundle_id, seed, quick, traffic, results)
        report["seconds"] = round(time.perf_counter() - t_start, 2)
        from stip.audit.report import write_report
        from stip.common.files import staged_directory

        with staged_directory(out_dir, overwrite=True) as stage:
            write_report(stage, report)
            if keep_capture:
                shutil.copytree(capture_dir, stage / "capture")
    return report


def _sizes(quick: bool, settings: dict[str, Any] | None, prompts: int | None, prompt_tokens: int | None,
           generate: int | None) -> dict[str, Any]:
    """The run's sizes: QUICK or DEFAULTS, then those in `settings`, then the arguments given."""
    sizes = {**(QUICK if quick else DEFAULTS), **{k: v for k, v in (settings or {}).items() if k in DEFAULTS}}
    if prompts is not None:
        sizes["prompts"] = int(prompts)
    if prompt_tokens is not None:
        sizes["prompt_tokens"] = int(prompt_tokens)
    if generate is not None:
        sizes["generate"] = int(generate)
    if sizes["prompts"] < 1 or sizes["prompt_tokens"] < 1 or sizes["generate"] < 0:
        raise StipError("--prompts and --prompt-tokens must be at least 1")
    return sizes


def _run_attacks(names: list[str], ctx: AuditContext, seed: int, budget_s: float) -> list[AttackResult]:
    """Each attack in turn, from the same torch seed, logged as it ends."""
    results = []
    for name in names:
        log.info("audit: attack %s", name)
        torch.manual_seed(seed)
        r = run_attack(name, ctx, budget_s)
        log.info("audit: %s: %s (%.1f s)", name, r.skipped or (f"{r.recovery:.3f} {r.unit}"
                                                               if r.recovery is not None else "done"), r.seconds)
        results.append(r)
    return results


def _report(bundle_dir: Path, reference, bundle_id: str, seed: int, quick: bool, traffic: dict,
            results: list[AttackResult]) -> dict:
    """The report's dict (without its total seconds): the mode, model, run and machine, traffic and attacks."""
    mode, options = mode_name(bundle_dir)
    return {
        "mode": mode, **options, "model": _model_name(bundle_dir, reference),
        "reference": None if reference is None else str(reference if not isinstance(reference, torch.nn.Module)
                                                       else type(reference).__name__),
        "bundle_id": bundle_id, "commit": _commit(), "machine": _machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seed": seed, "quick": quick,
        "traffic": traffic,
        "attacks": [r.to_json() for r in results],
    }


def _attack_names(attacks) -> list[str]:
    if attacks is None:
        return list(ATTACKS)
    names = [a.strip() for a in (attacks.split(",") if isinstance(attacks, str) else attacks) if a and a.strip()]
    unknown = [a for a in names if a not in ATTACKS]
    if unknown or not names:
        raise StipError(f"unknown attack(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ATTACKS)}")
    return names


def _model_name(bundle_dir: Path, reference) -> str:
    manifest = json.loads((bundle_dir / "server" / "stip-manifest.json").read_text())
    for key in ("source", "model", "model_name"):
        if manifest.get(key):
            return str(manifest[key])
    return str(manifest.get("model_type") or reference or "unknown")


def _commit() -> dict:
    import subprocess

    from stip.server.launch import REPO

    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}
    if head.returncode:
        return {"commit": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def _machine() -> dict:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}
