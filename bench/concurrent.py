"""Concurrent users through the real server: N client processes, each running `stip.Client.generate`, against one
`stip serve` process, beside plain transformers `generate` at batch N in this process.

This is what users of `stip serve` get when several of them generate at once: aggregate tokens/s = all tokens the N
clients generated / (last client done - all released together). The plain baseline is the unprotected model
generating the same prompt N times as one batch, greedy, in this process (no network): what a batching server could
reach on this machine. Client processes are started once (each with one torch thread, the shipped `stip.Client`, a
warm-up generation per server) and released together by the coordinator for every measurement.

The server's arguments are data (`SERVERS`, or `--serve-arg` below), so the same part measures any engine `stip
serve` offers. For each server it also reads the rows per tick from its /metrics (`stip_engine_tick_rows`): how
full the batched forwards were.

    python -m bench.concurrent PROTECTED_DIR [--clients 1 4 8] [--tokens 32] [--serve-arg=--no-batching]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import torch

WORKER_TIMEOUT_S = 600.0


SERVERS = {"stip serve (default, batched)": [], "stip serve --no-batching": ["--no-batching"]}


def servers() -> dict[str, list[str]]:
    """{label: extra `stip serve` arguments}: the default (continuous batching) and the serial server."""
    return dict(SERVERS)


def tick_rows(server) -> tuple[float, int]:
    """(rows summed over all ticks, ticks) from the server's rows-per-tick histogram; (0, 0) if it has none."""
    total = count = 0
    with contextlib.suppress(Exception):
        for line in server.metrics().splitlines():
            if line.startswith("stip_engine_tick_rows_sum"):
                total = float(line.split()[-1])
            elif line.startswith("stip_engine_tick_rows_count"):
                count = int(float(line.split()[-1]))
    return total, count


# ------------------------------------------------------------------------------------------------ client processes


def _worker(client_dir: str, prompt: list[int], k: int, conn) -> None:
    """One user: a `stip.Client` per server URL; generates on each ("generate", url, n) and answers with the result."""
    torch.set_num_threads(1)
    import stip

    clients: dict[str, stip.Client] = {}
    while (msg := conn.recv()) is not None:
        kind, url, n = msg
        try:
            if url not in clients:
                clients[url] = stip.Client(client_dir, url, k=k)
            g = clients[url].generate(ids=prompt, max_tokens=n)
            t = g.timing
            conn.send({"tokens": len(g.token_ids), "token_ids": g.token_ids, "total_ms": t.total_ms,
                       "per_token_ms": (t.total_ms - t.prefill_ms) / t.steps if t.steps else None,
                       "server_ms_per_token": t.server_ms_per_token})
        except Exception as e:  # the coordinator reports it; the worker stays for the next command
            conn.send({"error": f"{type(e).__name__}: {e}"})


class Users:
    """`n` client processes (spawned, so no torch thread pool is forked) that generate when released."""

    def __init__(self, n: int, client_dir: Path, prompt: list[int], k: int):
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(str(client_dir), prompt, k, child), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def generate(self, n_users: int, url: str, tokens: int) -> tuple[float, list[dict]]:
        """Release the first `n_users` together; (seconds until the last one is done, their results)."""
        conns = self.conns[:n_users]
        t0 = time.perf_counter()
        for c in conns:
            c.send(("generate", url, tokens))
        results = []
        for c in conns:
            if not c.poll(WORKER_TIMEOUT_S):
                raise TimeoutError(f"a client process gave no answer in {WORKER_TIMEOUT_S:.0f} s")
            results.append(c.recv())
        seconds = time.perf_counter() - t0
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]}")
        return seconds, results

    def close(self) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.send(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join()


def plain_batch(model, prompt: list[int], batch: int, tokens: int) -> tuple[float, list[int]]:
    """Plain greedy `generate` of exactly `tokens` tokens for `batch` copies of the prompt; (seconds, first row)."""
    ids = torch.tensor([prompt] * batch)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False,
                             pad_token_id=model.generation_config.pad_token_id or 0)
    return time.perf_counter() - t0, out[0, len(prompt):].tolist()


# ------------------------------------------------------------------------------------------------ the benchmark


def run(plain_model, protected_dir: Path, prompt: list[int], settings: dict, eos: set[int],
        serve: dict[str, list[str]] | None = None, log=print) -> dict:
    """Aggregate tokens/s of N concurrent `stip.Client` users through `stip serve` (each server of `serve`), and of
    plain `generate` at batch N; rounds interleave every variant. Returns a JSON-serialisable dict."""
    from bench.end_to_end import same_tokens
    from bench.report import paired, summarize
    from bench.scale_servers import start_all
    from stip.server.launch import local_server

    serve = servers() if serve is None else serve
    counts, tokens, rounds, k = settings["clients"], settings["tokens"], settings["rounds"], settings["topk"]
    threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        # the client processes and the servers start side by side (process start-ups, before anything is timed)
        users = Users(max(counts), protected_dir / "client", prompt, k)
        stack.callback(users.close)
        procs = start_all(stack, {label: local_server(protected_dir / "server", "--threads", str(threads), *args)
                                  for label, args in serve.items()})
        urls = {label: server.url for label, server in procs.items()}
        for url in urls.values():  # warm-up: process start, client load, each server's first session
            users.generate(max(counts), url, 2)
        plain_batch(plain_model, prompt, max(counts), 2)
        _, ref = plain_batch(plain_model, prompt, 1, tokens)
        tps = {(n, v): [] for n in counts for v in ["plain", *urls]}
        per_token = {(n, v): [] for n in counts for v in urls}
        rows_ticks = {(n, v): [0.0, 0] for n in counts for v in urls}
        same = {v: True for v in urls}
        t_start = time.perf_counter()
        for r in range(rounds):
            for n in counts:
                variants = ["plain", *urls]
                shift = (r + n) % len(variants)
                for v in variants[shift:] + variants[:shift]:
                    if v == "plain":
                        seconds, _ = plain_batch(plain_model, prompt, n, tokens)
                        tps[(n, v)].append(n * tokens / seconds)
                        continue
                    before = tick_rows(procs[v])
                    seconds, res = users.generate(n, urls[v], tokens)
                    after = tick_rows(procs[v])
                    rows_ticks[(n, v)][0] += after[0] - before[0]
                    rows_ticks[(n, v)][1] += after[1] - before[1]
                    tps[(n, v)].append(sum(x["tokens"] for x in res) / seconds)
                    per_token[(n, v)] += [x["per_token_ms"] for x in res if x["per_token_ms"] is not None]
                    same[v] &= all(same_tokens(ref, x["token_ids"], eos) for x in res)
            log(f"  concurrent: round {r + 1}/{rounds} ({time.perf_counter() - t_start:.0f} s)")
        seconds = time.perf_counter() - t_start

    rows = []
    for n in counts:
        row = {"clients": n, "plain_batch_tokens_per_s": summarize(tps[(n, "plain")]), "servers": {}}
        for v in urls:
            row["servers"][v] = {"tokens_per_s": summarize(tps[(n, v)]),
                                 "ratio_to_plain": paired(tps[(n, v)], tps[(n, "plain")]),
                                 "per_client_ms_per_token": summarize(per_token[(n, v)]),
                                 "rows_per_tick": round(rows_ticks[(n, v)][0] / rows_ticks[(n, v)][1], 2)
                                 if rows_ticks[(n, v)][1] else None}
        rows.append(row)
    return {
        "method": f"{rounds} round(s); per round and N: plain `generate` at batch N in this process, and N client "
                  f"processes (one `stip.Client` each, 1 torch thread) released together against each server; "
                  f"{tokens} tokens per user (greedy, the same prompt); aggregate tokens/s = tokens generated / "
                  f"(last user done - release); the order of the variants rotates",
        "servers": {label: {"args": ["--threads", str(threads), *args]} for label, args in serve.items()},
        "prompt_tokens": len(prompt),
        "settings": dict(settings),
        "torch_threads": threads,
        "same_tokens_as_plain": same,
        "rows": rows,
        "seconds": round(seconds, 1),
    }


def main(argv=None) -> None:
    """Standalone: `stip serve PROTECTED_DIR/server` with the given arguments, plain baseline on `--model`."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("protected", type=Path, help="the `stip protect` output folder (server/ and client/)")
    ap.add_argument("--model", default="smollm2", help="the plain model for the baseline (default smollm2)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--serve-arg", action="append", default=None,
                    help="an extra `stip serve` argument (repeat it); without any, every engine `servers()` finds")
    args = ap.parse_args(argv)
    from stip.client.bundle import ClientBundle
    from stip.models import load_plain_model

    plain, _ = load_plain_model(args.model)
    bundle = ClientBundle.load(args.protected / "client")
    text = bundle.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a long story."}],
                                                tokenize=False, add_generation_prompt=True)
    prompt = bundle.tokenizer(text, add_special_tokens=False)["input_ids"]
    serve = {"stip serve " + " ".join(args.serve_arg): args.serve_arg} if args.serve_arg else None
    settings = {"clients": args.clients, "tokens": args.tokens, "rounds": args.rounds, "topk": args.topk}
    os.environ.setdefault("TQDM_DISABLE", "1")
    print(json.dumps(run(plain, args.protected, prompt, settings, set(bundle.eos_token_ids), serve), indent=2))


if __name__ == "__main__":
    main()
