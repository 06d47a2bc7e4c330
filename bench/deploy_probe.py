"""The data owner's side of `python -m bench.deploy`: one device profile's client, run as its own process (under
`taskset` and an address-space limit, by the light venv's Python). It imports only what the light client imports
(stip's client, numpy, the standard library: never torch), so that its RSS and cold start are the light install's.

    python -m bench.deploy_probe CLIENT_BUNDLE SERVER_URL [--tokens N] [--reps R]   # prints one JSON object
    python -m bench.deploy_probe CLIENT_BUNDLE --offline                            # the client's per-token compute

Cold start: from the moment the parent started this process (STIP_DEPLOY_T0, wall clock; interpreter start-up
included) to a client ready for its first request: `import stip`, the bundle and its tokenizer loaded, the server's
/v1/info answered. `--offline` times the client's per-token work with no server (gather and embed a row, map 64
top-k ids through the key, pick, detokenize), so that the same figure can be taken on a real board and compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

T_START = time.time()
PROMPT = "Explain how photosynthesis works, step by step, for a school class."


def memory() -> dict:
    """This process's memory in MB (/proc/self/status): VmHWM is the peak resident set."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "VmPeak"):
                    out[name] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


def limits() -> dict:
    """What this process really runs under: the cores it may use and its address-space limit."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cores": cores, "address_space_gb": None if soft == resource.RLIM_INFINITY else round(soft / 2**30, 2)}


def _generation(client, ids: list[int], tokens: int) -> dict:
    g = client.generate(ids=ids, max_tokens=tokens)
    t = g.timing
    # The client's part of the first token: the prompt's embedding (its compute outside the decode steps, less the
    # last token's pick, which comes after the last decode step).
    prefill_client = max(0.0, t.client_ms - t.decode_client_ms - (t.client_ms_per_token or 0.0))
    return {"tokens": len(g.token_ids), "steps": t.steps, "ttft_ms": t.prefill_ms, "total_ms": t.total_ms,
            "per_token_ms": (t.total_ms - t.prefill_ms) / t.steps if t.steps else None,
            "client_ms": t.client_ms_per_token, "server_ms": t.server_ms_per_token, "network_ms": t.wire_ms_per_token,
            "ttft_client_ms": prefill_client, "bytes_up": t.bytes_sent_per_token,
            "bytes_down": t.bytes_received_per_token, "prefill_bytes_up": t.bytes_sent - t.decode_bytes_sent,
            "prefill_bytes_down": t.bytes_received - t.decode_bytes_received, "ids": g.token_ids}


def offline(bundle, steps: int = 300) -> dict:
    """The client's per-token compute with no server: the work `stip.Client` does between two decode round trips
    on the top-k downlink, on recorded-like replies (64 permuted ids and their values), median of `steps`."""
    import numpy as np

    from stip.client.token_stream import Detokenizer
    from stip.common.sampling import Sampler, SamplingParams

    rng = np.random.default_rng(0)
    ids = bundle.tokenizer(PROMPT)["input_ids"]
    sampler, detok = Sampler(SamplingParams(max_tokens=steps), ids), Detokenizer(bundle.tokenizer, ids)
    noise = bundle.noise_chain()
    times = []
    for step in range(steps):
        indices = rng.choice(bundle.vocab_size, 64, replace=False)
        values = np.sort(rng.standard_normal(64).astype(np.float32))[::-1].copy()
        t0 = time.perf_counter()
        token = sampler.from_topk(bundle.plain_ids(indices), values)
        sampler.observe(token)
        detok.push(token)
        bundle.embed(np.array([token], dtype=np.int64), start=len(ids) + step, noise=noise)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"steps": steps, "median_ms": statistics.median(times), "p90_ms": sorted(times)[int(0.9 * steps)]}


def run(bundle_dir: str, url: str | None, tokens: int, reps: int, k: int) -> dict:
    import stip
    from stip.client.bundle import ClientBundle

    bundle = ClientBundle.load(bundle_dir)
    out: dict = {"python": sys.executable, "limits": limits(), "torch_imported": "torch" in sys.modules}
    if url is None:
        out["offline"] = offline(bundle)
        out["memory"] = memory()
        return out
    clients = {"topk": stip.Client(bundle, url, downlink="topk", k=k)}
    t0 = float(os.environ.get("STIP_DEPLOY_T0", T_START))
    out["cold_start_ms"] = (time.time() - t0) * 1e3  # process start -> ready for the first request
    out["cold_start_in_process_ms"] = (time.time() - T_START) * 1e3  # less the interpreter's own start
    out["memory_ready"] = memory()
    clients["logits"] = stip.Client(bundle, url, downlink="logits", k=k)
    ids = clients["topk"].encode(messages=[{"role": "user", "content": PROMPT}])
    out["prompt_tokens"] = len(ids)
    for client in clients.values():
        client.generate(ids=ids, max_tokens=2)  # warm-up: the session path, the relay's threads, first allocations
    out["runs"] = {name: [] for name in clients}
    for _ in range(reps):  # the two downlinks interleaved, so that a burst of load hits both alike
        for name, client in clients.items():
            out["runs"][name].append(_generation(client, ids, tokens))
    out["offline"] = offline(bundle)
    out["memory"] = memory()
    out["torch_imported"] = "torch" in sys.modules
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.deploy_probe", description=__doc__.splitlines()[0])
    ap.add_argument("bundle", help="the protected model's client bundle")
    ap.add_argument("url", nargs="?", help="the server (or the relay in front of it)")
    ap.add_argument("--offline", action="store_true", help="only the client's per-token compute, no server")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-k", type=int, default=64, help="the top-k downlink's k")
    args = ap.parse_args(argv)
    if args.url is None and not args.offline:
        ap.error("give SERVER_URL, or --offline")
    print(json.dumps(run(args.bundle, None if args.offline else args.url, args.tokens, args.reps, args.k)))


if __name__ == "__main__":
    main()
