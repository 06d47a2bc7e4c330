"""GPU benchmark: a LLaMA-2-7B-shaped model with random fp16 weights, protected and served on one GPU; per-token
latency and aggregate throughput at batch 1 and 32, plain against round-trip against server-decode.

    python -m bench.gpu                 # needs a CUDA GPU; writes bench/results/gpu.json and gpu.md
    python -m bench.gpu --tiny --out /tmp/gpu-tiny   # a tiny LLaMA on CPU in fp32: the test suite's smoke run

Variants (each at every `--batch` size; a variant that fails or whose package is missing is recorded with the
reason, and the run goes on):

| variant | what runs | how it is timed |
|---|---|---|
| plain / HF generate | the unprotected model, `generate` at batch B in this process | greedy, exactly `--tokens` new tokens |
| plain / our engine | the unprotected model in `BatchedEngine` (the engine `stip serve` runs), B sessions, in process | one tick = B decode rows |
| plain / vLLM | the unprotected checkpoint on vLLM, token ids in and out (only when vLLM imports) | `LLM.generate`, B prompts |
| round-trip / ours, vLLM | `stip serve --engine transformers` (or `vllm`) on the protected bundle; B `stip.Client` processes released together | over loopback |
| server-decode / ours, vLLM | the same on a `protect(..., mode="server-decode")` bundle | over loopback |

Per-token latency: plain `generate` and vLLM, (time for N tokens - time for 1) / (N - 1); our engine, the median
decode tick; served variants, each client's decode time per token (median over clients). Throughput: all tokens
generated / wall time of the whole batch. The model has no EOS (its config sets none), so every sequence runs to
`--tokens`. The paper's anchor: LLaMA-2-7B on an A100, 12 ms per token unprotected, 31.7 ms with STIP over a LAN.

Kept under 10 minutes on one H100: one model build, two `protect` runs (13.5 GB each), at most four servers, one
measurement per batch size after a warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.gpu_variants import (SHAPES, build_model, plain_engine, plain_generate, plain_vllm, prompt_ids, served,
                                vllm_available)

NO_GPU = ("no GPU: bench.gpu needs a CUDA GPU (torch.cuda.is_available() is False here), so no GPU run was "
          "possible; `python -m bench.gpu --tiny` runs the same benchmark on a tiny model on CPU")


# ------------------------------------------------------------------------------------------------ the run


class _Progress:
    """What `run` has measured so far and its clock: rows per variant and batch size, what was not measured and
    why, each stage's seconds; variants not yet started are skipped once the time budget is spent."""

    def __init__(self, batches: list[int], budget_s: float | None, log):
        self.batches, self.budget_s, self.log = batches, budget_s, log
        self.t_start = time.perf_counter()
        self.results: dict = {"rows": [], "skipped": [], "timings_s": {}}

    def stage(self, name: str, t0: float) -> None:
        self.results["timings_s"][name] = round(time.perf_counter() - t0, 1)
        self.log(f"gpu bench: {name} done in {self.results['timings_s'][name]:.0f} s "
                 f"({time.perf_counter() - self.t_start:.0f} s in all)")

    def record(self, mode: str, engine: str, per_batch: dict[int, dict], note: str = "") -> None:
        for b in self.batches:
            r = per_batch[b]
            self.results["rows"].append({"mode": mode, "engine": engine, "batch": b,
                                         "per_token_ms": round(r["per_token_ms"], 2) if r["per_token_ms"] else None,
                                         "tokens_per_s": round(r["tokens_per_s"], 1),
                                         "seconds": round(r["seconds"], 2),
                                         **({"tokens_per_client": r["tokens_per_client"]}
                                            if "tokens_per_client" in r else {}),
                                         **({"same_as_plain": all(o == self.results["reference"]
                                                                  for o in r["outputs"])}
                                            if "outputs" in r and self.results.get("reference") else {}),
                                         **({"note": note} if note else {})})

    def over_budget(self, mode: str, engine: str) -> bool:
        """Past `budget_s`, what is left is listed as not measured, so one run stays within its time."""
        if self.budget_s is None or time.perf_counter() - self.t_start < self.budget_s:
            return False
        self.results["skipped"].append({"mode": mode, "engine": engine,
                                        "reason": f"time budget of {self.budget_s:.0f} s spent"})
        self.log(f"gpu bench: {mode} / {engine} skipped: time budget of {self.budget_s:.0f} s spent")
        return True

    def attempt(self, mode: str, engine: str, fn, note: str = "") -> None:
        if self.over_budget(mode, engine):
            return
        t0 = time.perf_counter()
        try:
            self.record(mode, engine, fn(), note)
        except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others
            self.results["skipped"].append({"mode": mode, "engine": engine,
                                            "reason": f"{type(e).__name__}: {e}"[:1000]})
            self.log(f"gpu bench: {mode} / {engine} failed: {type(e).__name__}: {str(e)[:300]}")
        self.stage(f"{mode} / {engine}", t0)


def run(tiny: bool, work: Path, batches: list[int], tokens: int, prompt_len: int, budget_s: float | None = None,
        log=print) -> dict:
    """Build the model, time the plain variants, then protect it in each mode and time it served by each engine."""
    import stip
    from bench.concurrent import Users

    shape = "tiny" if tiny else "llama2-7b"
    device = "cpu" if tiny else "cuda"
    dtype = torch.float32 if tiny else torch.float16
    dtype_name = "float32" if tiny else "float16"
    serve_base = ["--device", device, "--dtype", dtype_name, "--max-seq-len", str(prompt_len + tokens + 8)]
    if tiny:
        serve_base += ["--threads", "1"]
    tracker = _Progress(batches, budget_s, log)
    results = tracker.results

    plain_dir, rt_dir, sd_dir = work / "plain", work / "round-trip", work / "server-decode"
    t0 = time.perf_counter()
    model = build_model(shape, dtype, device, plain_dir)
    prompt = prompt_ids(SHAPES[shape]["vocab_size"], prompt_len)
    with torch.inference_mode():  # plain greedy, for the served variants' `same_as_plain`
        ref = model.generate(input_ids=torch.tensor([prompt], device=device), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    results["reference"] = ref[0, len(prompt):].tolist()
    tracker.stage("build and save the model", t0)

    tracker.attempt("plain", "HF generate",
                    lambda: {b: plain_generate(model, prompt, b, tokens, device) for b in batches})
    tracker.attempt("plain", "ours (in process)",
                    lambda: {b: plain_engine(model, prompt, b, tokens, device) for b in batches},
                    "engine level: the unprotected model in BatchedEngine, no network")
    model = ref = None  # free the device for the servers
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    has_vllm = vllm_available()
    if has_vllm:
        tracker.attempt("plain", "vLLM",
                        lambda: plain_vllm(plain_dir, prompt, batches, tokens, dtype_name, device, 300))
    else:
        results["skipped"].append({"mode": "all", "engine": "vLLM", "reason": "vllm is not importable here"})

    engines = [("ours", ["--engine", "transformers"])] + ([("vLLM", ["--engine", "vllm"])] if has_vllm else [])
    modes = [("round-trip", rt_dir, {}), ("server-decode", sd_dir, {"mode": "server-decode"})]
    for mode, folder, kw in modes:
        if tracker.over_budget(mode, "all"):
            continue
        t0 = time.perf_counter()
        try:
            stip.protect(plain_dir, folder, progress=False, **kw)
        except Exception as e:  # noqa: BLE001
            results["skipped"].append({"mode": mode, "engine": "all", "reason": f"protect failed: {e}"[:1000]})
            continue
        tracker.stage(f"protect ({mode})", t0)
        users = Users(max(batches), folder / "client", prompt, k=64)
        try:
            for engine, args in engines:
                tracker.attempt(mode, engine,
                                lambda: served(folder, serve_base + args, prompt, batches, tokens, users))
        finally:
            users.close()
        if not tiny:
            shutil.rmtree(folder / "server", ignore_errors=True)  # 13.5 GB of disk back before the next protect
    results["seconds"] = round(time.perf_counter() - tracker.t_start, 1)
    return results


def environment(tiny: bool) -> dict:
    from bench.report import machine_info

    info = machine_info()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    info["versions"]["vllm"] = _version("vllm")
    info["model"] = ("tiny LLaMA, random weights, float32, CPU" if tiny else
                     "LLaMA-2-7B shape (hidden 4096, 32 layers, 32 heads, FFN 11008, vocab 32000), random weights, "
                     "float16, one GPU")
    return info


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def markdown(doc: dict) -> str:
    """One table: per-token ms and aggregate tokens/s per variant and batch size."""
    batches = doc["settings"]["batches"]
    head = ["mode", "engine"] + [f"B={b}: ms/token, tok/s" for b in batches]
    rows: dict[tuple, dict] = {}
    for r in doc["rows"]:
        rows.setdefault((r["mode"], r["engine"]), {})[r["batch"]] = r
    lines = [f"# GPU benchmark ({doc['environment']['model']})", "",
             f"Command: `{doc['command']}`. Commit {doc['environment'].get('git_commit')}. "
             f"Device: {doc['environment'].get('gpu', 'CPU')}. Prompt {doc['settings']['prompt_tokens']} tokens, "
             f"{doc['settings']['tokens']} new tokens per sequence, greedy. Whole run: {doc['seconds']} s.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (mode, engine), per in rows.items():
        cells = [f"{per[b]['per_token_ms']} ms, {per[b]['tokens_per_s']}" if b in per else "-" for b in batches]
        lines.append(f"| {mode} | {engine} | " + " | ".join(cells) + " |")
    same = [f"{r['mode']} / {r['engine']} at B={r['batch']}: {'yes' if r['same_as_plain'] else 'NO'}"
            for r in doc["rows"] if "same_as_plain" in r]
    if same:
        lines += ["", "Every client's greedy tokens equal plain `generate` (random weights make near-ties likely, so a "
                      "NO here is a flag to look at, not a verdict): " + "; ".join(same) + "."]
    if doc["skipped"]:
        lines += ["", "Not measured:", ""] + [f"- {s['mode']} / {s['engine']}: {s['reason']}" for s in doc["skipped"]]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny LLaMA on CPU in float32 (seconds; no GPU needed)")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for gpu.json and gpu.md (default: bench/results on a GPU; none with --tiny)")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 32; --tiny: 1 2)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per sequence (default 64; --tiny: 8)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 64; --tiny: 16)")
    ap.add_argument("--budget", type=float, default=None, help="seconds after which variants not yet started are "
                    "skipped (default 540 on a GPU, so a run stays under 10 minutes; none with --tiny)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder for the checkpoints (default: a temp "
                    "folder; the 7B run needs about 30 GB)")
    args = ap.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    batches = args.batch or ([1, 2] if args.tiny else [1, 32])
    tokens = args.tokens or (8 if args.tiny else 64)
    prompt = args.prompt or (16 if args.tiny else 64)
    if min(batches) < 1 or tokens < 2 or prompt < 1:
        ap.error("batch sizes and --prompt must be at least 1, --tokens at least 2")
    out = args.out or (None if args.tiny else Path(__file__).resolve().parent / "results")
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.tiny:
        torch.set_num_threads(1)
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stip-gpu-bench-")))
        work.mkdir(parents=True, exist_ok=True)
        budget = args.budget if args.budget is not None else (None if args.tiny else 540.0)
        results = run(args.tiny, work, batches, tokens, prompt, budget, log=lambda m: print(m, file=sys.stderr))
    doc = {"command": shlex.join(["python", "-m", "bench.gpu", *(sys.argv[1:] if argv is None else argv)]),
           "environment": environment(args.tiny),
           "settings": {"batches": batches, "tokens": tokens, "prompt_tokens": prompt, "tiny": args.tiny},
           **results}
    text = json.dumps(doc, indent=2)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "gpu.json", text + "\n")
        write_atomic(out / "gpu.md", markdown(doc))
        print(f"gpu bench: wrote {out / 'gpu.json'} and {out / 'gpu.md'}", file=sys.stderr)
    print(text)
    return 0 if doc["rows"] and not [s for s in doc["skipped"] if s["engine"] != "vLLM"] else 1


if __name__ == "__main__":
    sys.exit(main())
