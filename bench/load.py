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
import contextlib
import json
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOP = 5  # the near-tie rule: the plain token must be among the client's top TOP at the first difference
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


# ------------------------------------------------------------------------------------------------ client processes


class _Log:
    """One JSON line per event, flushed at once, so a SIGKILL loses at most the line being written."""

    def __init__(self, path: Path):
        self._f = open(path, "a", buffering=1)
        self._lock = threading.Lock()

    def __call__(self, **event) -> None:
        with self._lock:
            self._f.write(json.dumps(event) + "\n")
            self._f.flush()


def _user(cfg: dict, bundle, pool: list[dict], uid: str, seed: int, log: _Log) -> None:
    """One user: wait, join with a new `stip.Client`, 1-3 generations, leave; until the deadline."""
    import stip
    from stip.client.transport import StipServerError

    rng = random.Random(seed)
    est = 1.0  # seconds a generation took last time: where a socket drop lands
    n = 0
    while True:
        time.sleep(rng.uniform(0, cfg["max_idle"]))
        if time.time() >= cfg["deadline"]:
            return
        try:
            client = stip.Client(bundle, cfg["url"], token=cfg["token"], k=cfg["k"], timeout=60,
                                 trusted=cfg["trusted"])
        except Exception as e:  # noqa: BLE001 - counted by kind
            log(event="error", user=uid, kind=f"join: {_kind(e)}", message=str(e)[:300])
            continue
        sessions: list = []
        opener = client.connection.open_session

        def tracked(resume=None, _open=opener, _seen=sessions):
            s = _open(resume)
            _seen.append(s)
            return s

        client.connection.open_session = tracked  # only records each session, to find the socket to drop
        for _ in range(rng.randint(1, 3)):
            if time.time() >= cfg["deadline"]:
                break
            i = rng.randrange(len(pool))
            gid = f"{uid}-{n}"
            n += 1
            drop = rng.random() < cfg["drop_rate"]
            log(event="start", gen=gid, prompt=i)
            sessions.clear()
            done = threading.Event()
            dropped = threading.Event()
            if drop:
                threading.Thread(target=_drop_later, args=(sessions, len(pool[i]["ids"]), rng.uniform(0.05, est),
                                                           done, dropped), daemon=True).start()
            t0 = time.perf_counter()
            try:
                g = client.generate(ids=pool[i]["ids"], max_tokens=pool[i]["max_tokens"], logprobs=TOP)
            except Exception as e:  # noqa: BLE001 - counted by kind
                done.set()
                status = f" {e.status}" if isinstance(e, StipServerError) else ""
                log(event="error", gen=gid, kind=f"{_kind(e)}{status}", dropped=dropped.is_set(),
                    message=str(e)[:300])
                continue
            done.set()
            est = max(0.1, time.perf_counter() - t0)
            tm = g.timing
            tops = [[t for t, _ in lp.top] for lp in (g.logprobs or [])]
            log(event="done", gen=gid, prompt=i, tokens=g.token_ids, tops=tops, dropped=dropped.is_set(),
                sessions=len(sessions), total_ms=tm.total_ms, first_token_ms=tm.prefill_ms,
                per_token_ms=(tm.total_ms - tm.prefill_ms) / tm.steps if tm.steps else None)
        del client  # leave: nothing of the user stays open (each generation closed its own session)


def _drop_later(sessions: list, prompt_len: int, delay: float, done: threading.Event,
                dropped: threading.Event) -> None:
    """After `delay` s and once the prompt is prefilled, shut the generation's TCP socket down under it: the server
    sees the connection vanish without a close, as when a laptop lid shuts."""
    if done.wait(delay):
        return
    while not done.is_set():
        s = sessions[-1] if sessions else None
        ws = getattr(s, "_ws", None)
        if s is not None and ws is not None and s.position >= prompt_len:
            with contextlib.suppress(OSError):
                ws.socket.shutdown(socket.SHUT_RDWR)
                dropped.set()
            return
        time.sleep(0.01)


def _kind(e: BaseException) -> str:
    return type(e).__name__


def worker_main(config_path: Path, events_path: Path) -> None:
    """A client process: `threads` users, each with its own `stip.Client` per visit, one bundle loaded once."""
    import torch

    torch.set_num_threads(1)
    from stip.client.bundle import ClientBundle

    cfg = json.loads(config_path.read_text())
    pool = json.loads(Path(cfg["pool"]).read_text())
    bundle = ClientBundle.load(cfg["client_dir"], trusted=cfg["trusted"])
    log = _Log(events_path)
    log(event="ready", pid=os.getpid())
    users = [threading.Thread(target=_user, args=(cfg, bundle, pool, f"{cfg['name']}u{j}", cfg["seed"] * 1000 + j,
                                                  log), daemon=True) for j in range(cfg["threads"])]
    for u in users:
        u.start()
    for u in users:
        u.join()
    log(event="exit")


class Workers:
    """The client processes; any one of them can be killed and replaced while the run goes on."""

    def __init__(self, base: dict, folder: Path, processes: int, clients: int):
        self.base, self.folder = base, folder
        self.threads = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
        self.procs: list[subprocess.Popen | None] = [None] * processes
        self.files: list[Path] = []
        self.killed: set[Path] = set()
        self.spawned = 0
        for slot in range(processes):
            self.spawn(slot)

    def spawn(self, slot: int) -> None:
        self.spawned += 1
        name = f"p{slot}i{self.spawned}"
        cfg = dict(self.base, name=name, threads=self.threads[slot], seed=self.base["seed"] * 100 + self.spawned)
        cfg_path = self.folder / f"{name}.json"
        cfg_path.write_text(json.dumps(cfg))
        events = self.folder / f"{name}.jsonl"
        events.touch()
        self.files.append(events)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                   TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
        env.pop("STIP_TOKEN", None)
        self.procs[slot] = subprocess.Popen([sys.executable, "-m", "bench.load", "--worker", str(cfg_path),
                                             str(events)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                            stderr=open(self.folder / f"{name}.err", "w"))
        self.procs[slot].events = events  # type: ignore[attr-defined]

    def kill_one(self, rng: random.Random) -> bool:
        """SIGKILL a live client process with its generations in flight and start another in its slot."""
        live = [i for i, p in enumerate(self.procs) if p is not None and p.poll() is None]
        if not live:
            return False
        slot = rng.choice(live)
        p = self.procs[slot]
        p.send_signal(signal.SIGKILL)
        p.wait()
        self.killed.add(p.events)  # type: ignore[attr-defined]
        self.spawn(slot)
        return True

    def wait(self, timeout: float) -> list[int]:
        """Wait for every process to finish; kill what is left at the timeout. Their exit codes."""
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
        return codes

    def events(self) -> list[tuple[Path, dict]]:
        out = []
        for f in self.files:
            for line in f.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):  # a line cut short by SIGKILL
                    out.append((f, json.loads(line)))
        return out


# ------------------------------------------------------------------------------------------------ server probes


def _get(url: str, token: str | None, timeout: float = 5.0) -> bytes:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
        return r.read()


def parse_metrics(text: str) -> dict[str, float]:
    """The unlabelled `stip_*` gauges and counters of a Prometheus text page (labelled ones keyed with labels)."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(stip_[A-Za-z0-9_]+(?:\{[^}]*\})?)\s+(\S+)$", line)
        if m:
            with contextlib.suppress(ValueError):
                out[m.group(1)] = float(m.group(2))
    return out


KV_GAUGES = ("stip_sessions_active", "stip_kv_caches_live", "stip_kv_cache_tokens", "stip_kv_budget_used_tokens")


class Monitor(threading.Thread):
    """Polls /health every second and /metrics every two; keeps failures and each gauge's peak."""

    def __init__(self, url: str, token: str):
        super().__init__(daemon=True)
        self.url, self.token = url, token
        self.stop = threading.Event()
        self.checks = self.failures = 0
        self.failure_examples: list[str] = []
        self.peaks: dict[str, float] = {}
        self.last_health: dict = {}

    def run(self) -> None:
        tick = 0
        while not self.stop.wait(1.0):
            tick += 1
            self.checks += 1
            try:
                self.last_health = json.loads(_get(self.url + "/health", None))
                if self.last_health.get("status") != "ok":
                    raise ValueError(f"status {self.last_health.get('status')!r}")
            except Exception as e:  # noqa: BLE001 - a failed probe is what is counted
                self.failures += 1
                if len(self.failure_examples) < 5:
                    self.failure_examples.append(f"{type(e).__name__}: {e}"[:200])
            if tick % 2 == 0:
                with contextlib.suppress(Exception):
                    for k, v in parse_metrics(_get(self.url + "/metrics", self.token).decode()).items():
                        if "{" not in k and not k.endswith("_created"):
                            self.peaks[k] = max(v, self.peaks.get(k, v))


def kv_at_end(url: str, token: str, timeout: float) -> dict:
    """Wait until no session, KV cache or reserved KV token is left (or `timeout` s); what /metrics and /v1/info say."""
    t0 = time.monotonic()
    while True:
        m = parse_metrics(_get(url + "/metrics", token).decode())
        kv = {k: m.get(k) for k in KV_GAUGES}
        if all(v == 0 for v in kv.values()) or time.monotonic() - t0 > timeout:
            break
        time.sleep(0.5)
    info = json.loads(_get(url + "/v1/info", token))
    closed = {re.sub(r'.*reason="([^"]*)".*', r"\1", k): int(v) for k, v in m.items()
              if k.startswith("stip_sessions_closed_total{")}
    return {"metrics": kv, "info": {k: info.get(k) for k in ("sessions", "kv_tokens")}, "sessions_closed": closed,
            "zero": all(v == 0 for v in kv.values()) and info.get("sessions") == 0 and info.get("kv_tokens") == 0,
            "seconds_waited": round(time.monotonic() - t0, 1)}


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


def run(protected: Path, plain_model, *, clients: int = 32, processes: int = 4, duration: float = 120.0,
        pool_size: int = 24, prompt_range=(4, 64), token_range=(8, 32), drop_rate: float = 0.1,
        kill_every: float | None = 30.0, session_ttl: float = 5.0, serve_args: list[str] = (), k: int = 64,
        max_idle: float = 2.0, threads: int | None = None, seed: int = 0, log=print) -> dict:
    """One load test against `stip serve PROTECTED/server`; returns the JSON-serialisable result."""
    from stip.client.bundle import ClientBundle
    from stip.server.launch import local_server

    processes = max(1, min(processes, clients))
    trusted = signer_pin(protected)
    bundle = ClientBundle.load(protected / "client", trusted=trusted)
    t0 = time.perf_counter()
    pool = make_pool(bundle, plain_model, pool_size, prompt_range, token_range, seed)
    log(f"load: {len(pool)} prompts with plain greedy continuations in {time.perf_counter() - t0:.0f} s")
    token = secrets.token_urlsafe(16)
    args = ["--session-ttl", str(session_ttl), *(["--threads", str(threads)] if threads else []),
            *(["--trust", trusted] if trusted else []), *serve_args]
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
        kills = 0
        next_kill = time.time() + (kill_every or 1e18)
        while time.time() < base["deadline"]:
            time.sleep(0.2)
            if kill_every and time.time() >= next_kill and base["deadline"] - time.time() > 2:
                kills += workers.kill_one(rng)
                next_kill += kill_every
        codes = workers.wait(timeout=180.0)
        run_seconds = time.time() - start
        log(f"load: all users left after {run_seconds:.0f} s; waiting for the server to free every session")
        end = kv_at_end(server.url, token, session_ttl + 15.0)
        monitor.stop.set()
        monitor.join()
        healthy_after = json.loads(_get(server.url + "/health", None)).get("status") == "ok"
        alive = server.alive
        events = workers.events()
        stderr_tail = {p.name: p.read_text()[-2000:] for p in folder.glob("*.err") if p.stat().st_size}

    # --- tally
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
    killed_gens = sum(1 for g, f in started.items() if g not in finished and f in workers.killed)
    lost = sum(1 for g, f in started.items() if g not in finished and f not in workers.killed)
    if lost:
        errors["unfinished (process exited)"] = lost
    tokens = sum(len(e["tokens"]) for e in done)
    per_token = [e["per_token_ms"] for e in done if e["per_token_ms"] is not None]
    first = [e["first_token_ms"] for e in done]
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
        "started": len(started),
        "completed": len(done),
        "correct": verdicts["exact"] + verdicts["near_tie"],
        "exact": verdicts["exact"],
        "near_tie": verdicts["near_tie"],
        "wrong": verdicts["wrong"],
        "wrong_examples": wrong_examples,
        "disconnects": {"socket_drop": drops, "process_kill": killed_gens, "processes_killed": kills},
        "errors": errors,
        "latency_ms": {"per_token_p50": pct(per_token, 50), "per_token_p95": pct(per_token, 95),
                       "first_token_p50": pct(first, 50), "first_token_p95": pct(first, 95),
                       "per_token_note": "each completed generation's decode time / its decode steps; "
                                         "percentiles over generations"},
        "throughput": {"tokens": tokens, "seconds": round(run_seconds, 1),
                       "tokens_per_s": round(tokens / run_seconds, 2) if run_seconds > 0 else None,
                       "note": "tokens of completed generations / (last user gone - start)"},
        "health": {"checks": monitor.checks, "failures": monitor.failures, "examples": monitor.failure_examples,
                   "ok_after": healthy_after, "server_alive": alive, "last": monitor.last_health},
        "metrics_peak": monitor.peaks,
        "kv_at_end": end,
        "worker_exit_codes": codes,
        "worker_stderr": stderr_tail,
    }
    result["ok"] = bool(done and result["wrong"] == 0 and not errors and monitor.failures == 0 and healthy_after
                        and alive and end["zero"])
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
