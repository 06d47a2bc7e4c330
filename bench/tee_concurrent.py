"""Several clients at once: N TEE clients against N round-trip clients (issue 23, step 5), on the parties
`bench.tee_latency` starts (round-trip `stip serve`, `stip serve --tee-worker`, `stip enclave`).

For each N, a warm-up round of each mode, then rounds alternating between the modes (round trip first in even
rounds, TEE first in odd ones). In a round N threads of this process each hold their own client (`stip.Client` for
the round trip, `TeeClient` for TEE mode), are released together and generate greedily on the same prompt. Per client: ms per decode token ((total - time to
first token) / steps). Per round: the median over clients, the aggregate tokens per second (all tokens / wall time
from release to the last client done), how many sessions shared each batched step (the enclave's /health
"batching"; the round-trip server's rows per tick from /metrics), and the enclave's pad pool hit rate over the round
(/health "pads": every batched step takes one pad row per session per offloaded group). Clients are threads (the
clients' own work per token is small next to the server's: sampling from a top-k downlink, or a channel frame).
"""

from __future__ import annotations

import statistics
import threading
import time

MODES = ("round_trip", "tee")


def _client(kind: str, b):
    from stip.client.sdk import Client
    from stip.client.tee import TeeClient

    if kind == "round_trip":
        return Client(b.plain / "client", b.server.url)
    return TeeClient(b.out / "tee-client", b.enclave.url, allow_simulated=True)


def _batching(kind: str, b) -> tuple[float, int, int, int]:
    """(steps or rows summed, batched steps or ticks, pad rows from the pools, pad rows made inline) so far, at the
    enclave or the round-trip server (which has no pads)."""
    if kind == "round_trip":
        from bench.concurrent import tick_rows

        return (*tick_rows(b.server), 0, 0)
    import httpx

    health = httpx.get(f"{b.enclave.url}/health", timeout=30).json()
    st, pads = health.get("batching", {}), health.get("pads", {})
    return float(st.get("steps", 0)), int(st.get("batches", 0)), int(pads.get("hits", 0)), int(pads.get("misses", 0))


def one_round(kind: str, b, n: int, tokens: int) -> dict:
    """N clients of one mode released together; per-client and aggregate figures."""
    clients = [_client(kind, b) for _ in range(n)]
    barrier, results, errors = threading.Barrier(n + 1), [None] * n, []

    def user(i: int) -> None:
        barrier.wait()
        try:
            t0 = time.perf_counter()
            g = clients[i].generate(ids=b.ids, max_tokens=tokens)
            results[i] = (t0, time.perf_counter(), g)
        except Exception as e:  # noqa: BLE001 - reported below, the round fails
            errors.append(f"{type(e).__name__}: {e}")

    before = _batching(kind, b)
    threads = [threading.Thread(target=user, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{kind} with {n} clients: {errors[0]}")
    after = _batching(kind, b)
    per_token = [(g.timing.total_ms - g.timing.prefill_ms) / max(1, g.timing.steps) for _, _, g in results]
    wall = max(end for _, end, _ in results) - min(start for start, _, _ in results)
    steps = after[1] - before[1]
    hits, misses = after[2] - before[2], after[3] - before[3]
    return {"per_token_ms": statistics.median(per_token), "per_token_ms_max": max(per_token),
            "tokens_per_s": sum(len(g.token_ids) for _, _, g in results) / wall,
            "mean_batch": (after[0] - before[0]) / steps if steps else None,
            "pad_hit_rate": hits / (hits + misses) if hits + misses else None, "pad_rows": [hits, misses],
            "ids": [g.token_ids for _, _, g in results]}


def measure(b, clients: list[int], tokens: int, repeats: int, log=print) -> dict:
    """For each N in `clients`: a warm-up round of each mode (not counted; the TEE one's pad hit rate is kept: N
    prompts at once meet the pools at their start size), then `repeats` rounds of each mode, interleaved; medians
    and the TEE / round-trip ratios."""
    out = {}
    for n in clients:
        warm = {kind: one_round(kind, b, n, tokens) for kind in MODES}
        log(f"{n} clients, warm-up: TEE pad hit rate {warm['tee']['pad_hit_rate']}")
        runs = {m: [] for m in MODES}
        for r in range(repeats):
            for kind in (MODES if r % 2 == 0 else MODES[::-1]):
                runs[kind].append(one_round(kind, b, n, tokens))
            log(f"{n} clients, round {r + 1}/{repeats}: " + ", ".join(
                f"{k} {runs[k][-1]['per_token_ms']:.1f} ms/token, {runs[k][-1]['tokens_per_s']:.1f} tok/s"
                for k in MODES))
        ref = runs["round_trip"][0]["ids"][0]
        same = all(ids[:len(ref)] == ref for k in MODES for run in runs[k] for ids in run.pop("ids"))
        summary = {k: {f: statistics.median(x[f] for x in runs[k]) for f in ("per_token_ms", "per_token_ms_max",
                                                                             "tokens_per_s")}
                   for k in MODES}
        for k in MODES:
            batches = [x["mean_batch"] for x in runs[k] if x["mean_batch"] is not None]
            summary[k]["mean_batch"] = statistics.median(batches) if batches else None
            hits, misses = (sum(x["pad_rows"][j] for x in runs[k]) for j in (0, 1))  # over all rounds, the first too
            summary[k]["pad_hit_rate"] = hits / (hits + misses) if hits + misses else None
        out[str(n)] = {"clients": n, "same_tokens": same, "summary": summary, "runs": runs,
                       "warm_up_pad_hit_rate": warm["tee"]["pad_hit_rate"],
                       "ratio_per_token": summary["tee"]["per_token_ms"] / summary["round_trip"]["per_token_ms"],
                       "ratio_throughput": summary["tee"]["tokens_per_s"] / summary["round_trip"]["tokens_per_s"]}
    return out


def markdown(concurrent: dict) -> list[str]:
    """Lines of the concurrent-clients table for latency.md."""
    if not concurrent:
        return []
    lines = ["", "Several clients at once (threads of the benchmark, released together, greedy on the same prompt; "
             "medians over rounds; per token: the median client's decode ms per token, and the slowest client's; "
             "sessions per batched step: the enclave's batches, the round-trip server's ticks):", "",
             "| clients | mode | ms per decode token (slowest) | tokens/s, all clients | sessions per batched step "
             "| TEE / round trip |", "|---|---|---|---|---|---|"]
    for n, c in concurrent.items():
        for k in MODES:
            s = c["summary"][k]
            batch = "-" if s["mean_batch"] is None else f"{s['mean_batch']:.1f}"
            ratio = "1.00" if k == "round_trip" else f"{c['ratio_per_token']:.2f} per token, " \
                                                      f"{c['ratio_throughput']:.2f} throughput"
            lines.append(f"| {n} | {k.replace('_', ' ')} | {s['per_token_ms']:.1f} ({s['per_token_ms_max']:.1f}) | "
                         f"{s['tokens_per_s']:.1f} | {batch} | {ratio} |")
        lines.append(f"| {n} | same tokens in every client and mode | {c['same_tokens']} | | | |")
        rate = c["summary"]["tee"].get("pad_hit_rate")
        if rate is not None:
            lines.append(f"| {n} | TEE: pad rows from the pool (hit rate, all counted rounds; the warm-up round, "
                         f"pools at their start size: {c.get('warm_up_pad_hit_rate') or 0:.3f}) | {rate:.3f} | | | |")
    return lines
