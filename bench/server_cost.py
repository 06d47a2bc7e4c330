"""Server-side cost: the protected model against the plain model on the same engine (transformers, in-process, fp32).

Engine-level, in-process batched forwards: batch B > 1 here is B sequences in one forward, which `stip serve` does not
do today (it runs its sessions one at a time); what several users get through the server is `bench.concurrent`.

The plain model is fed token ids (its own embedding lookup runs inside its forward); the protected model is fed
`inputs_embeds`, because in STIP the embedding lookup (and the secret permutation of the embeddings) happens on the
client: the embeddings are computed before the timer starts, as the server receives them ready-made. Everything
else is the same: one `DynamicCache` per batch, `logits_to_keep=1` (the server returns the last position's logits),
the same token ids, the same threads.

* prefill: B sequences of T tokens in one forward; tokens/s = B * T / seconds.
* decode: after an untimed prefill of `context` tokens, `steps` forwards of one token per sequence with the KV cache;
  tokens/s = B * steps / seconds (the sum of the timed forwards).

Variants are interleaved so that a drift in machine speed hits all alike: prefill forwards alternate between the
variants, the order rotating and reversing every repeat (ABBA for two); decode keeps every variant's KV cache live
side by side and alternates the order every step. Each repeat gives one paired ratio protected/plain, and the figure
is the median of those ratios (with its IQR and range). Target: >= 0.98.

Run to run: `run_processes` repeats the whole measurement in several fresh processes, each loading both models
anew (`python -m bench.server_cost`), and reports the spread of the per-process ratios beside the pooled one: a miss
of the target that this spread covers is noise of the machine, not a cost of the protection.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROCESS_TIMEOUT_S = 1800


def _cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _forward(model, inp: torch.Tensor, is_embeds: bool, cache) -> torch.Tensor:
    kw = {"inputs_embeds": inp} if is_embeds else {"input_ids": inp}
    return model(**kw, past_key_values=cache, use_cache=True, logits_to_keep=1).logits


def time_prefill(model, inp, is_embeds: bool) -> float:
    with torch.inference_mode():
        cache = _cache(model)
        t0 = time.perf_counter()
        _forward(model, inp, is_embeds, cache)
        return time.perf_counter() - t0


def _order(names: list[str], k: int) -> list[str]:
    """The k-th order of the variants: rotated by k // 2, reversed when k is odd (ABBA for two variants)."""
    r = (k // 2) % len(names)
    out = names[r:] + names[:r]
    return out[::-1] if k % 2 else out


def time_prefill_round(models: dict, inputs: dict, k: int) -> dict:
    """One prefill forward per variant, in the k-th order: {variant: seconds}."""
    return {v: time_prefill(models[v][0], inputs[v], models[v][1]) for v in _order(list(models), k)}


def time_decode_round(models: dict, inputs: dict, k: int) -> dict:
    """Decode every variant side by side, step by step (the order alternating every step), after an untimed prefill
    of the context: {variant: seconds summed over the timed steps}. Interleaving per step keeps the variants within
    milliseconds of each other, so a slow spell on the machine hits all of them."""
    names = list(models)
    total = dict.fromkeys(names, 0.0)
    with torch.inference_mode():
        caches = {v: _cache(models[v][0]) for v in names}
        for v in names:
            _forward(models[v][0], inputs[v][0], models[v][1], caches[v])
        for j in range(len(inputs[names[0]][1])):
            for v in _order(names, k + j):
                model, is_embeds = models[v]
                t0 = time.perf_counter()
                _forward(model, inputs[v][1][j], is_embeds, caches[v])
                total[v] += time.perf_counter() - t0
    return total


def _check_equivalence(plain, protected, embed, plain_logits, ids: torch.Tensor) -> float:
    """Max |logit difference| between the plain model and the un-permuted protected model on one prompt."""
    with torch.inference_mode():
        a = plain(input_ids=ids, logits_to_keep=1).logits[0, -1]
        b = plain_logits(protected(inputs_embeds=embed(ids), logits_to_keep=1).logits[0, -1])
    return float((a - b).abs().max())


def run(plain, protected, embed, plain_logits, settings: dict, vocab_size: int, log=print) -> dict:
    """One process's measurement. `embed(ids[B, T]) -> [B, T, d]` is the client's embedding (in the protected basis);
    `plain_logits` undoes the vocabulary permutation (only for the equivalence check). Returns a JSON-serialisable
    dict with every repeat's tokens/s per config and variant."""
    g = torch.Generator().manual_seed(0)
    repeats = settings["repeats"]
    models = {"plain": (plain, False), "protected": (protected, True)}
    configs = []
    for b, t in settings["prefill"]:
        ids = torch.randint(0, vocab_size, (b, t), generator=g)
        configs.append({"phase": "prefill", "batch": b, "tokens": t, "ids": ids, "embeds": embed(ids)})
    for b in settings["decode_batches"]:
        ctx = torch.randint(0, vocab_size, (b, settings["decode_context"]), generator=g)
        step_ids = [torch.randint(0, vocab_size, (b, 1), generator=g) for _ in range(settings["decode_steps"])]
        configs.append({"phase": "decode", "batch": b, "tokens": settings["decode_steps"],
                        "context": settings["decode_context"], "ids": (ctx, step_ids),
                        "embeds": (embed(ctx), [embed(s) for s in step_ids])})

    def one_round(cfg, k: int) -> dict:
        inputs = {v: cfg["embeds"] if is_embeds else cfg["ids"] for v, (_, is_embeds) in models.items()}
        fn = time_decode_round if cfg["phase"] == "decode" else time_prefill_round
        return fn(models, inputs, k)

    max_diff = _check_equivalence(plain, protected, embed, plain_logits,
                                  torch.randint(0, vocab_size, (1, 16), generator=g))
    for cfg in configs:  # warm-up: first-call allocations, lazy init, page faults
        one_round(cfg, 0)

    times = {i: {v: [] for v in models} for i in range(len(configs))}
    t_start = time.perf_counter()
    for r in range(repeats):
        for i, cfg in enumerate(configs):
            for v, seconds in one_round(cfg, r + i).items():
                times[i][v].append(seconds)
        log(f"  server cost: repeat {r + 1}/{repeats} ({time.perf_counter() - t_start:.0f} s)")
    rows = []
    for i, cfg in enumerate(configs):
        n_tokens = cfg["batch"] * cfg["tokens"]
        rows.append({"phase": cfg["phase"], "batch": cfg["batch"], "tokens": cfg["tokens"],
                     **({"context": cfg["context"]} if cfg["phase"] == "decode" else {}),
                     **{f"{v}_tps": [n_tokens / s for s in times[i][v]] for v in models}})
    return {"rows": rows, "max_abs_logit_diff": max_diff, "torch_threads": torch.get_num_threads(),
            "seconds": time.perf_counter() - t_start}


def measure_in_process(plain_model: str, protected_dir: Path, settings: dict, threads: int) -> dict:
    """Load both models in this (fresh) process, as `stip serve` and the plain baseline do, and measure."""
    from stip.client.bundle import ClientBundle
    from stip.models import load_plain_model
    from stip.server.model import load_protected_model

    torch.set_num_threads(threads)
    plain, _ = load_plain_model(plain_model)
    protected, _ = load_protected_model(Path(protected_dir) / "server")
    bundle = ClientBundle.load(Path(protected_dir) / "client")
    return run(plain, protected, bundle.embed, bundle.plain_logits, settings, bundle.vocab_size,
               log=lambda msg: print(msg, file=sys.stderr, flush=True))


def run_processes(plain_model: str, protected_dir: Path, settings: dict, log=print) -> dict:
    """`settings["processes"]` fresh processes, one after another, each measuring `settings["repeats"]` repeats;
    the figures pool every repeat, and the per-process medians give the run-to-run spread."""
    from bench.report import paired, summarize

    threads = torch.get_num_threads()
    runs = []
    t_start = time.perf_counter()
    for i in range(settings["processes"]):
        with tempfile.TemporaryDirectory(prefix="stip-server-cost-") as tmp:
            out = Path(tmp) / "run.json"
            cmd = [sys.executable, "-m", "bench.server_cost", "--plain", str(plain_model), "--protected",
                   str(protected_dir), "--settings", json.dumps(settings), "--threads", str(threads), "--out", str(out)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
                                      env={**os.environ, "TQDM_DISABLE": "1"}, timeout=PROCESS_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"server cost process {i + 1} gave no result in {PROCESS_TIMEOUT_S} s") from None
            if proc.returncode != 0:
                raise RuntimeError(f"server cost process {i + 1} failed ({proc.returncode}): {proc.stderr[-2000:]}")
            runs.append(json.loads(out.read_text()))
        log(f"  server cost: process {i + 1}/{settings['processes']} done ({time.perf_counter() - t_start:.0f} s)")

    rows = []
    for j, first in enumerate(runs[0]["rows"]):
        plain_tps = [x for r in runs for x in r["rows"][j]["plain_tps"]]
        prot_tps = [x for r in runs for x in r["rows"][j]["protected_tps"]]
        per_process = [paired(r["rows"][j]["protected_tps"], r["rows"][j]["plain_tps"])["median"] for r in runs]
        rows.append({k: first[k] for k in ("phase", "batch", "tokens", "context") if k in first}
                    | {"plain_tokens_per_s": summarize(plain_tps), "protected_tokens_per_s": summarize(prot_tps),
                       "ratio": paired(prot_tps, plain_tps), "ratio_per_process": summarize(per_process)})
    ratios = [r["ratio"]["median"] for r in rows]
    worst_per_process = [min(paired(r["rows"][j]["protected_tps"], r["rows"][j]["plain_tps"])["median"]
                             for j in range(len(rows))) for r in runs]
    repeats, n = settings["repeats"], settings["processes"]
    return {
        "engine": "transformers (in-process), fp32, DynamicCache, logits_to_keep=1; engine-level, in-process "
                  "batched forward (B sequences in one forward): not what `stip serve` does today (one session at "
                  "a time)",
        "inputs": "plain model: input_ids (its embedding lookup inside the forward); protected model: "
                  "inputs_embeds from the client bundle (the lookup is client-side in STIP, outside the timer)",
        "loading": "plain: stip.models.load_plain_model; protected: stip.server.model.load_protected_model (what "
                   "`stip serve` runs: weights copied out of the shard memory map)",
        "method": f"{n} fresh processes x {repeats} repeats; prefill: one forward per variant, the order rotating "
                  f"and reversing every repeat (ABBA); decode: both variants' KV caches live side by side, the order "
                  f"alternating every step; ratio = median of the paired protected/plain throughput ratios of all "
                  f"{n * repeats} repeats; per process: the median of that process's repeats",
        "settings": dict(settings),
        "torch_threads": threads,
        "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in runs),
        "rows": rows,
        "ratio_min": min(ratios),
        "ratio_median": statistics.median(ratios),
        "worst_config_ratio_per_process": summarize(worst_per_process),
        "target_ratio": 0.98,
        "seconds": round(time.perf_counter() - t_start, 1),
    }


def main(argv=None) -> None:
    """One fresh measuring process (`run_processes` starts these): writes `run`'s result as JSON to --out."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plain", required=True, help="the plain model: a folder, a .gguf file or 'smollm2'")
    ap.add_argument("--protected", required=True, type=Path, help="the `stip protect` output folder")
    ap.add_argument("--settings", required=True, help="JSON: prefill, decode_batches, decode_context, ...")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    result = measure_in_process(args.plain, args.protected, json.loads(args.settings), args.threads)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
