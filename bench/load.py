"""Load test: many `stip.Client` users join and leave a real `stip serve` at random, some losing their connection
mid-generation; every completed answer is checked against plain greedy, and the server must stay healthy and give
all its KV memory back once everyone has left.

    python -m bench.load PROTECTED_DIR --clients 32 --duration 120 [--model smollm2] [--out load.json]
        [--serve-arg=--no-batching ...]

How it runs:
- A pool of prompts of random lengths (chat messages of random words when the bundle has a tokenizer, random token
  ids otherwise), each with a random `max_tokens`, and the plain model's greedy continuation of each, computed here
  with transformers `generate` before the server starts.
- `stip serve PROTECTED_DIR/server` as its own process (the default engine unless `--serve-arg` says otherwise),
  with a short `--session-ttl` so that sessions whose clients vanished expire within the run.
- `--processes` client processes (`python -m bench.load --worker`), `--clients` users in all as threads. A user
  waits a random time, joins (a new `stip.Client`), runs 1-3 greedy generations on random prompts of the pool, leaves,
  and repeats until `--duration` is up. Each generation records its tokens and each step's top 5.
- Disconnects, two kinds:
  - `socket_drop`: with probability `--drop-rate`, a generation's TCP socket is shut down under it after the prefill
    (no WebSocket close, no session close). The server keeps the orphaned session until its TTL; the SDK
    reconnects and replays the context on a fresh session, so the answer must still be right.
  - `process_kill`: every `--kill-every` seconds one client process is SIGKILLed with its generations in flight
    (their sessions are orphaned) and a fresh process takes its place.
- A generation is correct if its tokens equal plain greedy, or if at the first difference the plain token is in the
  client's top 5 at that step (a near-tie; the two are not compared beyond it). Both counts are reported.
- `/health` is polled every second during the run; `/metrics` every two seconds. After the last user has left,
  the test waits until the server holds no session, no KV cache and no reserved KV token (at most the TTL plus 15 s).

The JSON result (`--out`, and stdout): completed, correct (exact / near-tie / wrong), disconnects by kind, errors by
kind, p50/p95 per-token decode latency and time to first token, aggregate tokens/s, health checks, and the KV state
at the end. Exit status 0 when everything held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import sys
import tempfile
import time
from pathlib import Path

from bench.load_clients import Workers, worker_main
from bench.load_probes import Monitor, http_get, kv_at_end

WORDS = ("the river night garden city music winter light story friend ocean mountain paper window quiet bright "
         "carefully because yesterday tomorrow explain why how many colour small large machine learning history "
         "science a of to in and what is describe write short poem about list three facts simple reason dog cat "
         "train journey market bread coffee morning evening forest stone bridge letter").split()


# ------------------------------------------------------------------------------------------------ the prompt pool


def make_pool(bundle, plain_model, n: int, prompt_range: tuple[int, int], token_range: tuple[int, int],
              seed: int) -> list[dict]:
    """`n` prompts of random lengths, each with a random max_tokens and the plain model's greedy continuation."""
    import torch

    rng = random.Random(seed)
    eos = set(bundle.eos_token_ids)
    chat = bundle.has_tokenizer and getattr(bundle.tokenizer, "chat_template", None)
    pool = []
    for _ in range(n):
        length = rng.randint(*prompt_range)
        if chat:
            text = " ".join(rng.choice(WORDS) for _ in range(length))
            text = bundle.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                        add_generation_prompt=True)
            ids = bundle.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = [rng.choice([t for t in range(bundle.vocab_size) if t not in eos]) for _ in range(length)]
        max_tokens = rng.randint(*token_range)
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = plain_model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                                       do_sample=False, eos_token_id=sorted(eos) or None,
                                       pad_token_id=sorted(eos)[0] if eos else 0)
        cont = out[0, len(ids):].tolist()
        if eos and any(t in eos for t in cont):  # generate pads after EOS: keep up to and including it
            cont = cont[:next(i for i, t in enumerate(cont) if t in eos) + 1]
        pool.append({"ids": ids, "max_tokens": max_tokens, "plain": cont})
    return pool


def judge(plain: list[int], got: list[int], tops: list[list[int]]) -> str:
    """"exact", "near_tie" (the first difference is a near-tie: the plain token is in the client's top 5 there), or
    "wrong"."""
    for i, (p, g) in enumerate(zip(plain, got)):
        if p != g:
            return "near_tie" if i < len(tops) and p in tops[i] else "wrong"
    return "exact" if len(plain) == len(got) else "wrong"



# ------------------------------------------------------------------------------------------------ the run


def signer_pin(protected: Path) -> str | None:
    """The developer's signer, pinned by the clients and the server as `--trust` does (when the folder has it)."""
    from stip.common.signing import load_signing_key, pin, signer_info

    key = protected / "developer" / "signing.key"
    return pin(signer_info(load_signing_key(key))) if key.is_file() else None


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))], 2)



def _kill_now_and_then(workers: Workers, deadline: float, kill_every: float | None, rng: random.Random) -> int:
    """Until the deadline, SIGKILL a client process every `kill_every` s (none in the last 2 s); how many."""
    kills = 0
    next_kill = time.time() + (kill_every or 1e18)
    while time.time() < deadline:
        time.sleep(0.2)
        if kill_every and time.time() >= next_kill and deadline - time.time() > 2:
            kills += workers.kill_one(rng)
            next_kill += kill_every
    return kills


def _run_users(protected: Path, pool: list[dict], args: list[str], token: str, trusted: str | None, *, clients: int,
               processes: int, duration: float, kill_every: float | None, session_ttl: float, k: int,
               max_idle: float, drop_rate: float, seed: int, log) -> dict:
    """Serve, let the users come and go for `duration` s, then wait for the server to free every session; what the
    run saw (the client processes' events, the monitor, the KV state at the end)."""
    from stip.server.launch import local_server

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="stip-load-") as tmp, \
            local_server(protected / "server", *args, token=token) as server:
        folder = Path(tmp)
        (folder / "pool.json").write_text(json.dumps(pool))
        monitor = Monitor(server.url, token)
        monitor.start()
        start = time.time() + 3.0  # room for the first processes to load the bundle
        base = {"url": server.url, "token": token, "k": k, "client_dir": str(protected / "client"),
                "pool": str(folder / "pool.json"), "deadline": start + duration, "drop_rate": drop_rate,
                "max_idle": max_idle, "seed": seed, "trusted": trusted}
        workers = Workers(base, folder, processes, clients)
        log(f"load: {clients} users in {processes} processes for {duration:.0f} s against {server.url} "
            f"(stip serve {' '.join(args)})")
        kills = _kill_now_and_then(workers, base["deadline"], kill_every, rng)
        codes = workers.wait(timeout=180.0)
        run_seconds = time.time() - start
        log(f"load: all users left after {run_seconds:.0f} s; waiting for the server to free every session")
        end = kv_at_end(server.url, token, session_ttl + 15.0)
        monitor.stop.set()
        monitor.join()
        return {"kills": kills, "codes": codes, "run_seconds": run_seconds, "end": end, "monitor": monitor,
                "healthy_after": json.loads(http_get(server.url + "/health", None)).get("status") == "ok",
                "alive": server.alive, "events": workers.events(), "killed": workers.killed,
                "stderr_tail": {p.name: p.read_text()[-2000:] for p in folder.glob("*.err") if p.stat().st_size}}


def _tally(events: list[tuple[Path, dict]], pool: list[dict], killed: set[Path]) -> dict:
    """Generations started, completed and judged; errors by kind; disconnects by kind."""
    started, finished = {}, set()
    done, errors, drops, verdicts = [], {}, 0, {"exact": 0, "near_tie": 0, "wrong": 0}
    wrong_examples = []
    for f, e in events:
        if e["event"] == "start":
            started[e["gen"]] = f
        elif e["event"] == "done":
            finished.add(e["gen"])
            done.append(e)
            drops += bool(e["dropped"])
            v = judge(pool[e["prompt"]]["plain"], e["tokens"], e["tops"])
            verdicts[v] += 1
            if v == "wrong" and len(wrong_examples) < 3:
                wrong_examples.append({"prompt": e["prompt"], "plain": pool[e["prompt"]]["plain"],
                                       "got": e["tokens"]})
        elif e["event"] == "error":
            finished.add(e.get("gen"))
            errors[e["kind"]] = errors.get(e["kind"], 0) + 1
            drops += bool(e.get("dropped"))
    killed_gens = sum(1 for g, f in started.items() if g not in finished and f in killed)
    lost = sum(1 for g, f in started.items() if g not in finished and f not in killed)
    if lost:
        errors["unfinished (process exited)"] = lost
    return {"started": started, "done": done, "errors": errors, "drops": drops, "verdicts": verdicts,
            "wrong_examples": wrong_examples, "killed_gens": killed_gens}


def run(protected: Path, plain_model, *, clients: int = 32, processes: int = 4, duration: float = 120.0,
        pool_size: int = 24, prompt_range=(4, 64), token_range=(8, 32), drop_rate: float = 0.1,
        kill_every: float | None = 30.0, session_ttl: float = 5.0, serve_args: list[str] = (), k: int = 64,
        max_idle: float = 2.0, threads: int | None = None, seed: int = 0, log=print) -> dict:
    """One load test against `stip serve PROTECTED/server`; returns the JSON-serialisable result."""
    from stip.client.bundle import ClientBundle

    processes = max(1, min(processes, clients))
    trusted = signer_pin(protected)
    bundle = ClientBundle.load(protected / "client", trusted=trusted)
    t0 = time.perf_counter()
    pool = make_pool(bundle, plain_model, pool_size, prompt_range, token_range, seed)
    log(f"load: {len(pool)} prompts with plain greedy continuations in {time.perf_counter() - t0:.0f} s")
    token = secrets.token_urlsafe(16)
    args = ["--session-ttl", str(session_ttl), *(["--threads", str(threads)] if threads else []),
            *(["--trust", trusted] if trusted else []), *serve_args]
    seen = _run_users(protected, pool, args, token, trusted, clients=clients, processes=processes,
                      duration=duration, kill_every=kill_every, session_ttl=session_ttl, k=k, max_idle=max_idle,
                      drop_rate=drop_rate, seed=seed, log=log)
    t = _tally(seen["events"], pool, seen["killed"])
    done, verdicts, monitor, end = t["done"], t["verdicts"], seen["monitor"], seen["end"]
    tokens = sum(len(e["tokens"]) for e in done)
    per_token = [e["per_token_ms"] for e in done if e["per_token_ms"] is not None]
    first = [e["first_token_ms"] for e in done]
    run_seconds = seen["run_seconds"]
    result = {
        "command": "python -m bench.load " + " ".join(sys.argv[1:]) if __name__ == "__main__" else None,
        "settings": {"clients": clients, "processes": processes, "duration_s": duration, "pool": pool_size,
                     "prompt_range": list(prompt_range), "token_range": list(token_range), "drop_rate": drop_rate,
                     "kill_every_s": kill_every, "session_ttl_s": session_ttl, "topk": k, "max_idle_s": max_idle,
                     "seed": seed},
        "server_args": args,
        "pool": {"prompts": len(pool), "prompt_tokens": [min(len(p["ids"]) for p in pool),
                                                         max(len(p["ids"]) for p in pool)],
                 "plain_tokens": [min(len(p["plain"]) for p in pool), max(len(p["plain"]) for p in pool)]},
        "started": len(t["started"]),
        "completed": len(done),
        "correct": verdicts["exact"] + verdicts["near_tie"],
        "exact": verdicts["exact"],
        "near_tie": verdicts["near_tie"],
        "wrong": verdicts["wrong"],
        "wrong_examples": t["wrong_examples"],
        "disconnects": {"socket_drop": t["drops"], "process_kill": t["killed_gens"],
                        "processes_killed": seen["kills"]},
        "errors": t["errors"],
        "latency_ms": {"per_token_p50": pct(per_token, 50), "per_token_p95": pct(per_token, 95),
                       "first_token_p50": pct(first, 50), "first_token_p95": pct(first, 95),
                       "per_token_note": "each completed generation's decode time / its decode steps; "
                                         "percentiles over generations"},
        "throughput": {"tokens": tokens, "seconds": round(run_seconds, 1),
                       "tokens_per_s": round(tokens / run_seconds, 2) if run_seconds > 0 else None,
                       "note": "tokens of completed generations / (last user gone - start)"},
        "health": {"checks": monitor.checks, "failures": monitor.failures, "examples": monitor.failure_examples,
                   "ok_after": seen["healthy_after"], "server_alive": seen["alive"], "last": monitor.last_health},
        "metrics_peak": monitor.peaks,
        "kv_at_end": end,
        "worker_exit_codes": seen["codes"],
        "worker_stderr": seen["stderr_tail"],
    }
    result["ok"] = bool(done and result["wrong"] == 0 and not t["errors"] and monitor.failures == 0
                        and seen["healthy_after"] and seen["alive"] and end["zero"])
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("protected", type=Path, nargs="?", help="the `stip protect` output folder (server/, client/)")
    ap.add_argument("--model", default="smollm2", help="the plain model for the greedy references (default smollm2)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--processes", type=int, default=4, help="client processes the users are spread over")
    ap.add_argument("--duration", type=float, default=120.0, help="seconds users keep joining")
    ap.add_argument("--pool", type=int, default=24, help="prompts in the pool")
    ap.add_argument("--prompt-words", type=int, nargs=2, default=[4, 64], metavar=("MIN", "MAX"),
                    help="prompt length: words of the chat message (token ids without a tokenizer)")
    ap.add_argument("--max-tokens", type=int, nargs=2, default=[8, 32], metavar=("MIN", "MAX"))
    ap.add_argument("--drop-rate", type=float, default=0.1, help="share of generations whose socket is dropped")
    ap.add_argument("--kill-every", type=float, default=30.0, help="SIGKILL a client process this often (0: never)")
    ap.add_argument("--session-ttl", type=float, default=5.0, help="the server's --session-ttl")
    ap.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve-arg", action="append", default=[], help="an extra `stip serve` argument (repeat it)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result here too")
    ap.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(*args.worker)
        return 0
    if args.protected is None:
        ap.error("PROTECTED_DIR is required")
    if not (args.protected / "server").is_dir() or not (args.protected / "client").is_dir():
        ap.error(f"{args.protected} is not a `stip protect` output folder (server/ and client/)")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    from stip.models import load_plain_model

    if args.threads:
        torch.set_num_threads(args.threads)
    plain, _ = load_plain_model(args.model)
    result = run(args.protected, plain, clients=args.clients, processes=args.processes, duration=args.duration,
                 pool_size=args.pool, prompt_range=tuple(args.prompt_words), token_range=tuple(args.max_tokens),
                 drop_rate=args.drop_rate, kill_every=args.kill_every or None, session_ttl=args.session_ttl,
                 serve_args=args.serve_arg, k=args.topk, threads=args.threads, seed=args.seed,
                 log=lambda m: print(m, file=sys.stderr))
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.out)  # never a half-written result
    print(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
