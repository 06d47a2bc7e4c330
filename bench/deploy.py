"""The data owner on three devices and three networks (issue 22): the light client (no torch) against a protected
SmolLM2 served by the full install, every device and every network simulated on this machine and named so.

    python -m bench.deploy                       # 3 device profiles x 3 networks, both downlinks
    python -m bench.deploy --quick --out /tmp/d  # the laptop profile on the wired network, a few tokens (CI)

- Server: `stip serve --expose-timing` from the full install, its own process, pinned to the last core with one
  torch thread (the client profiles that take one core take core 0), on the protected SmolLM2 bundle of `stip demo`'s
  cache (~/.cache/stip/smollm2, protected there first if missing) or `--bundle DIR` (a `stip protect` output).
- Client: `python -m bench.deploy_probe` run by the light venv's Python (built from this environment's installed
  files like tests/test_light_client.py's: pyproject's base dependencies, no torch, no transformers), one process
  per cell, under the profile's `taskset` and RLIMIT_AS (`ulimit -v`). `--client-python` runs another Python
  instead (the results say which).
- Device profiles (simulations): desktop, both cores, no limit; laptop, `taskset -c 0` and 4 GB of address space;
  edge board, `taskset -c 0`, 2 GB, and, since this machine has neither cpufreq nor cpulimit (checked, recorded),
  its client compute multiplied afterwards by `--edge-slowdown` (an assumed factor, stated beside every figure it
  touches; `python -m bench.deploy_probe BUNDLE --offline` on a real board gives the factor to use).
- Networks: loopback, and `bench.netsim` relays for wired (0.5 ms RTT, 1 Gbit/s) and wireless (40 ms RTT, 20 Mbit/s,
  1% segment loss, its recovery delay modelled); each relay is calibrated (what it really delivers) before use.
- Per cell and downlink (top-k, all logits): per-token latency split into client, network and server (the client's
  own `Timing`; network = round trip less the server's reported compute), bytes per token each way, time to first
  token, the client's peak RSS and its cold start. Once: the light venv's installed size, and issue 22's 7B-shaped
  budgets (`bench.deploy_table`: a synthetic 32000 x 4096 float16 client bundle, the client's per-token code on one
  core, RSS against tokenizer + touched rows + 50 MB; `--table`, `--touch`, `--no-table`).

Results: OUT/deploy.json and OUT/deploy.md (default bench/results/deploy/), the paper's three settings beside ours.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.netsim import NetProfile

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "results" / "deploy"
EDGE_SLOWDOWN = 2.0


@dataclass(frozen=True)
class Device:
    name: str
    label: str
    stands_for: str  # the paper's device it simulates
    one_core: bool  # taskset -c 0 (else every core)
    address_space_gb: float | None  # RLIMIT_AS
    slowdown: bool = False  # client compute multiplied by the edge factor afterwards


DEVICES = {
    "desktop": Device("desktop", "desktop: both cores, no memory limit", "desktop PC, 8-core i7", False, None),
    "laptop": Device("laptop", "laptop: 1 core (taskset -c 0), 4 GB address space", "MacBook Pro, 4-core i5", True,
                     4.0),
    "edge": Device("edge", "edge board: 1 core (taskset -c 0), 2 GB address space, client compute x the edge factor",
                   "NVIDIA Orin board", True, 2.0, slowdown=True),
}
NETWORKS = {
    "loopback": None,
    "wired": NetProfile("wired", "wired LAN (0.5 ms RTT, 1 Gbit/s)", rtt_ms=0.5, mbit=1000.0),
    "wireless": NetProfile("wireless", "wireless (40 ms RTT, 20 Mbit/s, 1% loss)", rtt_ms=40.0, mbit=20.0,
                           loss=0.01),
}


# ------------------------------------------------------------------------------------------------ the pieces


def throttles() -> dict:
    """What this machine offers to slow a core down: cpufreq's clock limits, the cpulimit tool."""
    freq = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_max_freq")
    return {"cpufreq": str(freq) if freq.exists() else None,
            "cpufreq_writable": freq.exists() and os.access(freq, os.W_OK), "cpulimit": shutil.which("cpulimit")}


def protected_bundle(given: Path | None, log) -> Path:
    """The `stip protect` output folder: `given`, else `stip demo`'s cached SmolLM2 (protected now if missing)."""
    if given is not None:
        if not (given / "client").is_dir() or not (given / "server").is_dir():
            raise SystemExit(f"error: {given} is not a `stip protect` output (it needs client/ and server/)")
        return given
    import io

    from rich.console import Console

    from stip.demo import ensure_bundle

    text = io.StringIO()
    out, _, _ = ensure_bundle(Path.home() / ".cache" / "stip", Console(file=text, width=200))
    log(text.getvalue().strip())
    return out


def _tree_bytes(root: Path, skip_cache: bool) -> int:
    return sum(f.stat().st_size for f in root.rglob("*")
               if f.is_file() and not f.is_symlink() and not (skip_cache and "__pycache__" in f.parts))


def install_size(python: Path) -> dict:
    """The light venv's installed files (its site-packages: the dependencies pip installs for `pip install stip`)
    and stip's own package (the venv reaches this checkout through a .pth; a wheel would copy stip/)."""
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    per = {}
    for entry in site.iterdir():
        if entry.is_dir() and not entry.name.endswith(".dist-info"):
            per[entry.name] = _tree_bytes(entry, skip_cache=False)
    deps, deps_no_cache = _tree_bytes(site, False), _tree_bytes(site, True)
    stip_bytes = _tree_bytes(REPO / "stip", skip_cache=True)
    top = sorted(per.items(), key=lambda kv: -kv[1])[:10]
    return {"site_packages_mb": round(deps / 1e6, 1), "site_packages_without_pycache_mb": round(deps_no_cache / 1e6, 1),
            "stip_package_mb": round(stip_bytes / 1e6, 1), "total_mb": round((deps + stip_bytes) / 1e6, 1),
            "largest_mb": {name: round(b / 1e6, 1) for name, b in top}}


@contextlib.contextmanager
def client_python(given: str | None, log):
    """(python, how it was made, install size or None): the light venv, built in a temporary folder, or `given`."""
    if given:
        yield Path(given), f"{given} (given with --client-python: not the light venv)", None
        return
    from tests.light.venv import build  # the venv tests/test_light_client.py runs the light client in

    with tempfile.TemporaryDirectory(prefix="stip-deploy-venv-") as tmp:
        t0 = time.perf_counter()
        python = build(Path(tmp) / "venv")
        seconds = time.perf_counter() - t0
        log(f"[deploy] light venv built in {seconds:.1f} s (tests/light/venv.py: base dependencies, no torch)")
        done = subprocess.run([str(python), "-c", "import torch"], capture_output=True, cwd="/")
        if done.returncode == 0:
            raise SystemExit("error: the light venv imports torch")
        yield python, "the light venv (tests/light/venv.py: pyproject's base dependencies, no torch, no " \
                      "transformers)", {**install_size(python), "build_seconds": round(seconds, 1)}


@contextlib.contextmanager
def server(protected: Path, threads: int, core: int | None):
    """`stip serve` from the full install, its own process (pinned to `core` if given), the server's compute time
    reported to the client (`--expose-timing`)."""
    from stip.server.launch import local_process, serve_command

    pin = ["taskset", "-c", str(core)] if core is not None else []
    with local_process(lambda port: pin + serve_command(protected / "server", "--threads", str(threads),
                                                        "--expose-timing", port=port)) as srv:
        yield srv


@contextlib.contextmanager
def in_background(cm):
    """Enter the context manager `cm` in a thread (a server takes seconds to load) and yield a future of what it
    gives; exit it at the end, once entered."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1, thread_name_prefix="deploy-start")
    future = pool.submit(cm.__enter__)
    try:
        yield future
    finally:
        pool.shutdown(wait=True)
        if future.exception() is None:
            cm.__exit__(None, None, None)


def probe(python: Path, device: Device, client_dir: Path, url: str, tokens: int, reps: int, k: int) -> dict:
    """One cell: the probe process under the device's core and memory limits; its JSON."""
    limit = int(device.address_space_gb * 2**30) if device.address_space_gb else None

    def limited():
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    cmd = (["taskset", "-c", "0"] if device.one_core else []) + [
        str(python), "-m", "bench.deploy_probe", str(client_dir), url, "--tokens", str(tokens), "--reps", str(reps),
        "-k", str(k)]
    env = {k_: v for k_, v in os.environ.items() if k_ not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["STIP_DEPLOY_T0"] = repr(time.time())
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, preexec_fn=limited, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"{device.name}: {' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    import json

    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ the cells


def _median(runs: list[dict], key: str):
    xs = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(xs) if xs else None


def cell_rows(device: Device, network: str, got: dict, slowdown: float) -> list[dict]:
    """Per downlink: the medians over generations, and for a slowed-down device the figures with its client
    compute multiplied by `slowdown` (measured figure + (slowdown - 1) x the client's part)."""
    from bench.report import summarize

    rows = []
    for downlink, runs in got["runs"].items():
        row = {"device": device.name, "network": network, "downlink": downlink, "generations": len(runs),
               "tokens": [r["tokens"] for r in runs], "steps": sum(r["steps"] for r in runs)}
        for key in ("per_token_ms", "client_ms", "network_ms", "server_ms", "ttft_ms", "ttft_client_ms",
                    "bytes_up", "bytes_down", "prefill_bytes_up", "prefill_bytes_down"):
            row[key] = _median(runs, key)
        row["per_token_summary"] = summarize([r["per_token_ms"] for r in runs if r["per_token_ms"] is not None])
        row["cold_start_ms"], row["cold_start_in_process_ms"] = got["cold_start_ms"], got["cold_start_in_process_ms"]
        row["rss_peak_mb"] = got["memory"].get("VmHWM")
        row["rss_mb"] = got["memory"]
        row["offline_client_ms"] = got["offline"]["median_ms"]
        row["limits"] = got["limits"]
        row["ids"] = runs[0]["ids"] if runs else []
        if device.slowdown:
            extra = slowdown - 1.0
            row["simulated"] = {
                "factor": slowdown, "client_ms": row["client_ms"] * slowdown,
                "per_token_ms": row["per_token_ms"] + extra * row["client_ms"],
                "ttft_ms": row["ttft_ms"] + extra * row["ttft_client_ms"],
                "cold_start_ms": row["cold_start_ms"] * slowdown,
                "offline_client_ms": row["offline_client_ms"] * slowdown}
        rows.append(row)
    return rows


def measure(python: Path, started, protected: Path, devices: list[str], networks: list[str], settings: dict,
            log) -> dict:
    """Every network (its relay calibrated first, once the server has loaded: no load beside it) x every device,
    against the server `started` gives (a future)."""
    from bench import netsim

    calibration, rows, torch_seen = {}, [], False
    srv = started.result()
    for name in networks:
        if NETWORKS[name] is not None:
            calibration[name] = netsim.calibrate(NETWORKS[name])
            log(f"[deploy] netsim {name}: configured {asdict(NETWORKS[name])}; measured {calibration[name]}")
    for name in networks:
        with contextlib.ExitStack() as stack:
            url = srv.url
            if NETWORKS[name] is not None:
                url = f"http://127.0.0.1:{stack.enter_context(netsim.relay_process(srv.port, NETWORKS[name]))}"
            for dev in devices:
                t0 = time.perf_counter()
                got = probe(python, DEVICES[dev], protected / "client", url, settings["tokens"], settings["reps"],
                            settings["k"])
                torch_seen |= got["torch_imported"]
                settings["prompt_tokens"] = got["prompt_tokens"]
                rows += cell_rows(DEVICES[dev], name, got, settings["edge_slowdown"])
                log(f"[deploy] {dev} x {name}: " + "; ".join(
                    f"{r['downlink']} {r['per_token_ms']:.1f} ms/token (client {r['client_ms']:.2f})"
                    for r in rows[-2:]) + f" [{time.perf_counter() - t0:.0f} s]")
    return {"rows": rows, "calibration": calibration, "torch_imported": torch_seen}


# ------------------------------------------------------------------------------------------------ the run


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.deploy", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="laptop x wired, 6 tokens, 1 generation per downlink (CI)")
    ap.add_argument("--out", type=Path, default=OUT, help=f"where deploy.json and deploy.md go (default {OUT})")
    ap.add_argument("--bundle", type=Path, default=None,
                    help="a `stip protect` output of SmolLM2 (default: stip demo's cache, ~/.cache/stip/smollm2)")
    ap.add_argument("--devices", nargs="+", choices=list(DEVICES), default=None)
    ap.add_argument("--networks", nargs="+", choices=list(NETWORKS), default=None)
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per generation (default 32; quick 6)")
    ap.add_argument("--reps", type=int, default=None, help="generations per cell and downlink (default 3; quick 1)")
    ap.add_argument("-k", type=int, default=64, help="the top-k downlink's k (default 64)")
    ap.add_argument("--server-threads", type=int, default=1, help="the server's torch threads (default 1)")
    ap.add_argument("--edge-slowdown", type=float, default=EDGE_SLOWDOWN,
                    help=f"the edge board's client compute factor (default {EDGE_SLOWDOWN}, assumed)")
    ap.add_argument("--client-python", default=None, help="run the client with this Python, not the light venv")
    ap.add_argument("--table", default=None, metavar="ROWSxCOLS",
                    help="the synthetic float16 client table timed on 1 core (default 32000x4096, 7B-shaped; quick "
                         "4096x512)")
    ap.add_argument("--touch", type=int, default=None, help="its decode steps, each on a new row (default 1000; "
                                                            "quick 100)")
    ap.add_argument("--no-table", action="store_true", help="leave the synthetic table out")
    a = ap.parse_args(argv)
    a.devices = a.devices or (["laptop"] if a.quick else list(DEVICES))
    a.networks = a.networks or (["wired"] if a.quick else list(NETWORKS))
    a.tokens = a.tokens or (6 if a.quick else 32)
    a.reps = a.reps or (1 if a.quick else 3)
    if a.edge_slowdown < 1:
        ap.error("--edge-slowdown must be at least 1")
    try:
        a.table = tuple(int(x) for x in (a.table or ("4096x512" if a.quick else "32000x4096")).lower().split("x"))
        assert len(a.table) == 2 and min(a.table) > 0
    except (ValueError, AssertionError):
        ap.error("--table takes ROWSxCOLS, e.g. 32000x4096")
    a.touch = a.touch or (100 if a.quick else 1000)
    return a


def main(argv: list[str] | None = None) -> dict:
    import shlex

    from bench.deploy_report import PAPER, write
    from bench.report import git, machine_info

    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731 - stdout carries the table
    t0 = time.perf_counter()
    doc = {"command": shlex.join(["python", "-m", "bench.deploy", *argv]), "commit": git("rev-parse", "HEAD"),
           "dirty": bool(git("status", "--porcelain", "--untracked-files=no")), "machine": machine_info(),
           "quick": a.quick, "throttles": throttles(),
           "settings": {"tokens": a.tokens, "reps": a.reps, "k": a.k, "server_threads": a.server_threads,
                        "edge_slowdown": a.edge_slowdown, "devices": a.devices, "networks": a.networks,
                        "table": None if a.no_table else list(a.table), "touch": a.touch},
           "devices": {d: asdict(DEVICES[d]) for d in a.devices},
           "networks": {n: (asdict(NETWORKS[n]) if NETWORKS[n] else {"name": n, "label": "loopback (no added delay)"})
                        for n in a.networks},
           "paper": PAPER}
    protected = protected_bundle(a.bundle, log)
    doc["bundle"] = str(protected)
    cores = os.cpu_count() or 1
    core = cores - 1 if cores > 1 else None  # the one-core client profiles take core 0
    with in_background(server(protected, a.server_threads, core)) as started, \
            client_python(a.client_python, log) as (python, how, size):
        doc["client_python"], doc["client_install"] = how, size
        got = measure(python, started, protected, a.devices, a.networks, doc["settings"], log)
        if not a.no_table:  # issue 22's 7B-shaped budgets, on the laptop profile (the server idles meanwhile)
            from bench import deploy_table

            doc["table"] = deploy_table.measure(python, protected / "client", a.table, a.touch, log=log)
    for n, c in got["calibration"].items():
        doc["networks"][n]["measured"] = c
    doc["server"] = (f"stip serve --threads {a.server_threads} --expose-timing (the full install, its own process"
                     + (f", pinned to core {core})" if core is not None else ")"))
    doc["rows"], doc["client_imported_torch"] = got["rows"], got["torch_imported"]
    first = doc["rows"][0]["ids"] if doc["rows"] else []
    doc["same_tokens_everywhere"] = all(r["ids"] == first for r in doc["rows"])
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    text = write(doc, a.out)
    sys.stdout.write(text)
    return doc


if __name__ == "__main__":
    main()
