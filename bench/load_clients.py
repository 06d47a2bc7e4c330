"""The load test's users: client processes (`python -m bench.load --worker`), each running a few users as threads
that join, generate and leave at random; some generations lose their socket mid-way. One JSON line per event.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOP = 5  # the near-tie rule: the plain token must be among the client's top TOP at the first difference


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
