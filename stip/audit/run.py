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
from pathlib import Path
from typing import Any

import torch

from stip.audit.attacks import ATTACKS
from stip.audit.attacks.base import AttackResult
from stip.audit.capture import read_capture
from stip.audit.context import AuditContext, Truth
from stip.audit.levels import AUTO, Models, attacker_weights, check_vocab, load_reference, parse_levels, \
    public_language_model
from stip.audit.runner import run_attack, run_levels
from stip.errors import StipError

__all__ = ["run_audit", "run_attack", "load_reference", "CharTokenizer", "DEFAULTS", "QUICK"]

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
    if manifest.get("mode", "round-trip") not in ("round-trip", "server-decode"):
        raise StipError(f"{bundle_dir} is a {manifest.get('mode')} bundle; `stip audit` attacks round-trip and "
                        f"server-decode bundles")
    return bundle_dir


def check_out_dir(out_dir: str | Path, force: bool) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise StipError(f"report folder {out_dir} exists and is not empty; pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise StipError(f"report folder {out_dir} is a file")
    return out_dir


def mode_name(bundle_dir: Path) -> tuple[str, dict]:
    """("paper" or e.g. "mix+rope+noise=0.01", the options) from the server bundle's manifest. A server-decode
    bundle says so ("server-decode+..."); AloePri's names the knobs that differ from the paper's defaults
    ("aloepri:alpha_e=0.25,alpha_h=0")."""
    manifest = json.loads((Path(bundle_dir) / "server" / "stip-manifest.json").read_text())
    harden = list(manifest.get("harden") or [])
    noise = float(manifest.get("noise") or 0.0)
    knobs = manifest.get("aloepri")
    options = {"harden": harden, "noise": noise, "bundle_mode": manifest.get("mode", "round-trip")}
    if knobs is not None:
        default = _aloepri_defaults(bundle_dir, knobs)
        changed = ",".join(f"{k}={v:g}" for k, v in knobs.items() if k in default and v != default[k])
        harden = [f"aloepri:{changed}" if h == "aloepri" and changed else h for h in harden]
        options["aloepri"] = knobs
    parts = harden + ([f"noise={noise:g}"] if noise else []) + (["head=client"] if manifest.get("head") == "client"
                                                                 else [])
    if options["bundle_mode"] == "server-decode" and knobs is None:
        parts.insert(0, "server-decode")
    return ("+".join(parts) if parts else "paper"), options


def _aloepri_defaults(bundle_dir: Path, knobs: dict) -> dict:
    """AloePri's default knobs, with the default h as this model's heads fitted it (SmolLM2: 128 -> 135)."""
    from stip.developer.aloepri_options import AloepriOptions, fitted_h

    default = AloepriOptions().as_dict()
    cfg = json.loads((Path(bundle_dir) / "server" / "config.json").read_text())
    h = int(knobs.get("h", 0))
    d, heads = int(cfg.get("hidden_size", 0)) - 2 * h, int(cfg.get("num_attention_heads", 1))
    if d > 0 and fitted_h(default["h"], d, heads) == h:
        default["h"] = h
    return default


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


def run_audit(bundle_dir: str | Path, out_dir: str | Path, reference: str | Path | torch.nn.Module | None = None,
              attacks: list[str] | tuple[str, ...] | str | None = None, prompts: int | None = None,
              prompt_tokens: int | None = None, capture_layers: str | list[int] | None = None,
              settings: dict[str, Any] | None = None, seed: int = 0, quick: bool = False, force: bool = False,
              keep_capture: bool = False, generate: int | None = None, threads: int | None = None,
              while_serving=None, levels: str | list[str] | None = None,
              exact: str | Path | torch.nn.Module | None = None, public_lm=AUTO,
              budget_s: float | None = None) -> dict:
    """Audit the protected folder `bundle_dir` (server/, client/, developer/) and write the report to `out_dir`
    (report.json, report.md, plots; with `keep_capture` also the raw capture). Returns the report's dict.

    `levels`: what the attacker knows, "none", "base", "exact" or a comma list (stip.audit.levels; default exact
    with weights given, else none): one capture, every attack at every level. `reference`: the weights the
    attacker holds (a packaged name such as "smollm2", a local HF folder or a loaded model): the base at level base,
    else the exact weights; `exact`: level exact's weights when `reference` is the base. `public_lm`: a public LM
    with the same tokenizer (AUTO: smollm2 at level none when the tokenizer matches; None: none).
    `attacks`: names from `ATTACKS` (default all). `settings`: per-attack knobs ({"vocab_matching": {...}}, a
    "budget_s" there too) and sizes (see DEFAULTS); `quick`: small budgets; `budget_s`: seconds after which each
    attack is stopped (0: none). `while_serving(url, token)`: more work on the same real server after the audit's
    requests (the table command measures accuracy there); the sessions it opens are left out of the audit."""
    t_start = time.perf_counter()
    bundle_dir = check_bundle(bundle_dir)
    out_dir = check_out_dir(out_dir, force)
    names = _attack_names(attacks)
    sizes = _sizes(quick, settings, prompts, prompt_tokens, generate)
    if budget_s is not None:
        sizes["attack_budget_s"] = float(budget_s)
    level_names = parse_levels(levels, reference, exact)
    sources = attacker_weights(level_names, reference, exact)
    if isinstance(capture_layers, (list, tuple)):
        capture_layers = ",".join(str(int(x)) for x in capture_layers)

    from stip.client.bundle import ClientBundle

    client = ClientBundle.load(bundle_dir / "client")
    tokenizer = client.tokenizer if client.has_tokenizer else CharTokenizer(client.vocab_size)
    weights, public_model, attacker = _attacker(sources, public_lm, client, tokenizer)
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
        traffic = _traffic(requests, sizes, observations, time.perf_counter() - t0)
        ctx = AuditContext(
            server_dir=bundle_dir / "server", observations=observations,
            truth=Truth(truth_ids(observations, contexts), bundle_dir), tokenizer=tokenizer,
            public_ids=token_ids(tokenizer, "public", sizes["public_tokens"]),
            heldout_ids=token_ids(tokenizer, "heldout", sizes["heldout_tokens"]),
            settings={"quick": quick, **(settings or {})}, seed=seed, public_lm=public_model)
        results = run_levels(names, ctx, weights, seed, sizes["attack_budget_s"] or None)
        report = _report(bundle_dir, reference, client.bundle_id, seed, quick, traffic, results)
        report |= {"attacker": attacker, "budget_s": sizes["attack_budget_s"],
                   "seconds": round(time.perf_counter() - t_start, 2)}
        from stip.audit.report import write_report
        from stip.common.files import staged_directory

        with staged_directory(out_dir, overwrite=True) as stage:
            write_report(stage, report)
            if keep_capture:
                shutil.copytree(capture_dir, stage / "capture")
    return report


def _attacker(sources: dict[str, Any], public_lm, client, tokenizer) -> tuple[dict, torch.nn.Module | None, dict]:
    """The models each level's attacker holds ({level: model or None}), the public LM, and what the report says
    of them ({"weights": {level: the weights' name or None}, "public_lm": ...})."""
    models = Models()
    weights = {}
    for level, source in sources.items():
        weights[level], _ = models.get(source)
        check_vocab(weights[level], source, client.vocab_size)
    public_model, public_note = public_language_model(public_lm, list(sources), tokenizer, client.has_tokenizer,
                                                      client.vocab_size, models)
    return weights, public_model, {"weights": {lv: _describe(src) for lv, src in sources.items()},
                                   "public_lm": public_note}


def _traffic(requests: list[list[int]], sizes: dict, observations: list, seconds: float) -> dict:
    return {"prompts": len(requests), "prompt_tokens": sizes["prompt_tokens"],
            "decode_steps": sizes["generate"], "observations": len(observations),
            "rows": sum(int(o.inputs.shape[0]) for o in observations),
            "capture_layers": sorted({layer for o in observations for layer in o.hidden}),
            "seconds": round(seconds, 2)}


def _describe(weights) -> str | None:
    if weights is None:
        return None
    return type(weights).__name__ if isinstance(weights, torch.nn.Module) else str(weights)


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


def _report(bundle_dir: Path, reference, bundle_id: str, seed: int, quick: bool, traffic: dict,
            results: list[tuple[str, AttackResult]]) -> dict:
    """The report's dict (without the attacker, budget and total seconds): the mode, model, run and machine,
    traffic, the levels and the attacks (each with its level)."""
    mode, options = mode_name(bundle_dir)
    return {
        "mode": mode, **options, "model": _model_name(bundle_dir, reference), "reference": _describe(reference),
        "levels": list(dict.fromkeys(level for level, _ in results)),
        "bundle_id": bundle_id, "commit": _commit(), "machine": _machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seed": seed, "quick": quick,
        "traffic": traffic,
        "attacks": [{**r.to_json(), "level": level} for level, r in results],
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
