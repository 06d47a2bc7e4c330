"""`python -m bench` (and `stip bench`, which runs it): STIP against the plain model and against secure two-party
computation, in one run.

Why the suite lives wholly in the repository's `bench/` folder and not in the installed package: a benchmark run is
a developer's job on a checkout. It records the git commit and whether the tree is clean, writes the committed
results under bench/results, and drives the scripts beside it (each also run alone as `python -m bench.NAME`), some
of which need packages no user install has (CrypTen, matplotlib). The installed `stip` package never imports this
folder; `stip bench` (stip/bench.py) only starts `python -m bench` in the checkout next to it, in a child process.

The parts are data (`bench.suite_parts.PARTS`: server_cost, concurrent, end_to_end, protect, mpc, scale), each a
function of the shared `Run`. `bench.report` writes results.json, results.md and PNG plots in `out`.

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
from datetime import datetime, timezone
from pathlib import Path

from bench.suite_parts import PARTS, Part, Run, prepare, say
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
PLOTS_INSTALL = "pip install -e '.[bench]' (matplotlib)"
PLOTS_NEED = ("matplotlib",)


def bench_root() -> Path:
    """The repository folder holding `bench/`, put on sys.path (and PYTHONPATH, for the child processes)."""
    repo = Path(__file__).resolve().parent.parent
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(repo) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(repo), *paths])
    return repo


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


def _select(parts: list[str] | None, quick: bool) -> tuple[list[Part], list[Part]]:
    """(the parts to run, the parts a run without `--part` runs); an unknown name is refused."""
    known = {p.name: p for p in PARTS}
    unknown = [n for n in parts or [] if n not in known]
    if unknown:
        raise StipError(f"unknown benchmark part(s) {', '.join(unknown)}: choose from {', '.join(known)}")
    defaults = [p for p in PARTS if quick or p.in_full]
    selected = [p for p in PARTS if p.name in parts] if parts else defaults
    return selected, defaults


def _new_results(cfg: dict, quick: bool, selected: list[Part], defaults: list[Part], tree: dict) -> dict:
    """What results.json records before any part runs: the command, settings, tree state and machine."""
    from bench import report

    return {
        "meta": {"command": report.command_line(), "quick": quick, "settings": cfg, "model": None,
                 "parts": [p.name for p in selected], "all_parts": selected == defaults, "git": tree,
                 "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), "cwd": os.getcwd()},
        "machine": report.machine_info(),
        "errors": {},
        "skipped": {},
        "notes": _notes(),
    }


def _run_parts(run: Run, selected: list[Part], results: dict) -> None:
    """Each selected part in turn; a part's failure is recorded in results["errors"] and the next one runs."""
    if any(p.needs_model for p in selected):
        try:
            prepare(run, results)
        except Exception as e:
            results["errors"]["model"] = f"{type(e).__name__}: {e}"
            say(traceback.format_exc())
    for i, part in enumerate(selected, 1):
        lacking = missing_modules(part.needs)
        if lacking:
            results["skipped"][part.name] = f"needs {', '.join(lacking)}, not installed: {part.install}"
            say(f"{i}/{len(selected)} skipping {part.title}: {results['skipped'][part.name]}")
            continue
        if part.needs_model and run.bundle is None:
            continue  # the model failed: already in errors
        say(f"{i}/{len(selected)} {part.title}")
        try:
            results[part.name] = part.measure(run)
            partial = results[part.name].get("errors") if isinstance(results[part.name], dict) else None
            if partial:  # some of the part failed; what it measured is kept
                results["errors"][part.name] = "; ".join(f"{k}: {v}" for k, v in partial.items())
        except Exception as e:
            results["errors"][part.name] = f"{type(e).__name__}: {e}"
            say(traceback.format_exc())
        gc.collect()


def _finish(results: dict, cpu0, t_start: float) -> None:
    """The end of the run: load average, other processes' CPU time, whether plots can be drawn, the duration."""
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
        say(f"skipping the plots: {results['skipped']['plots']}")
    results["meta"]["seconds"] = round(time.perf_counter() - t_start, 1)
    for key in ("errors", "skipped"):
        if not results[key]:
            del results[key]


def _print_summary(results: dict, tree: dict) -> None:
    """The headline figures and skipped parts on stdout; raises if a part failed."""
    from bench.report_headline import headline

    for name, value, target in headline(results):
        print(f"  {name}: {value}{f'  (target {target})' if target else ''}")
    for name, note in results.get("skipped", {}).items():
        print(f"  skipped {name}: {note}")
    if not tree["clean"]:
        print("  DIRTY TREE - not for committing: these results come from uncommitted code")
    if results.get("errors"):
        raise StipError("stip bench: some parts failed: " + "; ".join(f"{k}: {v}" for k, v in
                                                                       results["errors"].items()))


def run_bench(quick: bool = False, out: Path = Path("bench/results"), parts: list[str] | None = None,
              settings: dict | None = None) -> dict:
    """Run the benchmark parts (all, or those named in `parts`), write results to `out`; return the results.
    `settings` replaces parts' settings by name (e.g. {"scale": {...}}, from `python -m bench --clients ...`)."""
    bench_root()
    from bench import netsim, report

    selected, defaults = _select(parts, quick)
    _setup_torch()
    cfg = {**(QUICK if quick else FULL), **(settings or {})}
    tree = tree_state()
    if not tree["clean"]:
        say(f"DIRTY TREE - not for committing: {tree['changes']} uncommitted change(s) at "
            f"{(tree['commit'] or 'no git commit')[:12]}; the results will say so")
    cpu0 = _cpu_counters()
    if threading.current_thread() is threading.main_thread():  # on SIGTERM, still stop the server and relays
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = Path(out)
    t_start = time.perf_counter()
    results = _new_results(cfg, quick, selected, defaults, tree)
    run = Run(cfg, quick, Path(tempfile.mkdtemp(prefix="stip-bench-")), [netsim.PROFILES[n] for n in cfg["networks"]])
    try:
        _run_parts(run, selected, results)
    finally:
        run.plain = run.bundle = None
        shutil.rmtree(run.work, ignore_errors=True)
    _finish(results, cpu0, t_start)
    results = report.write(results, out, log=say)
    say(f"done in {results['meta']['seconds']:.0f} s")
    _print_summary(results, tree)
    return results
