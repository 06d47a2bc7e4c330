"""Summaries, machine details, and the written results: results.json, then results.md (`bench.report_markdown`)
and the PNG plots (`bench.report_plots`)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from bench.report_markdown import markdown
from bench.report_plots import plots


# ------------------------------------------------------------------------------------------------ statistics


def summarize(xs) -> dict:
    """Median with its spread: quartiles (inclusive method) and range."""
    xs = [float(x) for x in xs]
    if not xs:
        return {"median": float("nan"), "p25": float("nan"), "p75": float("nan"), "min": float("nan"),
                "max": float("nan"), "n": 0}
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "p25": q[0], "p75": q[2], "min": min(xs), "max": max(xs), "n": len(xs)}


def paired(a, b) -> dict:
    """Summary of the paired ratios a[i] / b[i]."""
    return summarize([x / y for x, y in zip(a, b)])


# ------------------------------------------------------------------------------------------------ machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent.parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    try:
        mem = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        mem = None
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain")
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
        simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    except (OSError, IndexError):
        simd = []
    return {
        "cpu": _cpu_model(),
        "cpu_simd": simd,
        "cores": os.cpu_count(),
        "cores_available": affinity,
        "memory_gb": round(mem / 2**30, 1) if mem else None,
        "torch_threads": torch.get_num_threads(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {n: _version(n) for n in ("stip", "torch", "transformers", "crypten", "websockets", "uvicorn",
                                              "numpy", "matplotlib")},
        "git_commit": (commit[:12] + ("+dirty" if dirty else "")) if commit else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def command_line() -> str:
    """The command that ran, as a user would type it."""
    import shlex

    argv = sys.argv
    if argv and (Path(argv[0]).name in ("stip", "cli.py") or argv[0].endswith(("stip/cli.py", "stip/cli/__main__.py"))):
        return shlex.join(["stip", *argv[1:]])
    if argv and Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name == "bench":
        return shlex.join(["python", "-m", "bench", *argv[1:]])  # the suite, also as `stip bench` starts it
    if argv and Path(argv[0]).name == "__main__.py":
        return shlex.join(["python", "-m", "stip.cli", *argv[1:]])
    return shlex.join([Path(sys.executable).name, *argv])


# ------------------------------------------------------------------------------------------------ writing


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return None if x != x else round(x, 6)
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, Path):
        return str(x)
    return str(x)


def write(results: dict, out: Path, log=print) -> dict:
    """results.json, PNG plots, then results.md (which links the plots)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = []
    if "plots" not in results.get("skipped", {}):
        try:
            results["plots"] = plots(results, out)
        except ImportError as e:
            results.setdefault("skipped", {})["plots"] = f"{e}: pip install -e '.[bench]' (matplotlib)"
    results = _jsonable(results)
    for name, text in (("results.json", json.dumps(results, indent=2) + "\n"), ("results.md", markdown(results))):
        tmp = out / f".{name}.tmp"  # never a half-written file under the real name
        tmp.write_text(text)
        tmp.replace(out / name)
    log(f"wrote {out / 'results.md'}, {out / 'results.json'} and {len(results['plots'])} plots")
    return results
