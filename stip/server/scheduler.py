"""Continuous batching: concurrent sessions' steps become ticks, one `Engine.step_batch` call each.

`Scheduler` wraps an engine and is itself an `Engine` whose `prefill`/`decode` may be called from many threads at
once (the server gives each in-flight step its own thread). Each call queues a job and blocks; one tick thread loops:
take every pending job, run one tick, hand each job its logits. A session joins at its first step and leaves when it
stops sending; nobody waits for anyone's sequence to finish.

Tick rule: every pending single-token step (a decode) joins the next tick; multi-token prefills share a budget of
`chunk_tokens` tokens per tick, first come first served, and a longer prefill is cut into chunks across ticks. So a
long prompt delays the decodes of others by at most one chunk's worth of compute per tick, instead of stalling them
for its whole length. A session has at most one step in flight (it waits for each reply), so order within a session
is preserved; a failing step fails only its own session.

Gathering: in round-trip mode a session's next step arrives one client round trip after its reply, and the replies
of one tick reach the clients at slightly different times. A tick started as soon as the first step is back would
run a few rows, and the rest a moment later in a second tick that costs nearly as much (the forward is bound by
reading the weights). So the tick thread waits, after a tick, for the sessions of that tick to send their next step,
but only until `gather` (a fraction of the last tick's compute time, at most `gather_max_s`) has passed; a session
that closes, or does not come back in time, is not waited for again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from stip.server.engine import Engine, Step

log = logging.getLogger("stip.server")

DEFAULT_CHUNK_TOKENS = 256
# How long the tick thread waits for the sessions of the last tick to send their next step: this fraction of the
# last tick's compute time, at most GATHER_MAX_S (see the module docstring).
GATHER_FRACTION = 0.5
GATHER_MAX_S = 0.05
ROWS_EMA = 0.1  # weight of the newest tick in the moving average of rows per tick


@dataclass(eq=False)  # compared by identity: a job holds tensors
class _Job:
    state: Any
    embeds: torch.Tensor
    all_positions: bool
    future: Future = field(default_factory=Future)
    done: int = 0  # tokens already run
    parts: list = field(default_factory=list)  # logits of finished chunks ("all" only)

    @property
    def remaining(self) -> int:
        return self.embeds.shape[0] - self.done


class Scheduler(Engine):
    """Merges concurrent steps on `engine` into ticks (see the module docstring)."""

    def __init__(self, engine: Engine, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, max_concurrent: int = 1024,
                 gather: float = GATHER_FRACTION, gather_max_s: float = GATHER_MAX_S):
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
        self.engine, self.chunk_tokens = engine, chunk_tokens
        self.gather, self.gather_max_s = gather, gather_max_s
        self.name = getattr(engine, "name", type(engine).__name__)
        for name in ("hidden_size", "vocab_size", "model_type", "max_positions", "dtype", "manifest",
                     "kv_bytes_per_token"):
            if hasattr(engine, name):
                setattr(self, name, getattr(engine, name))
        self.concurrent_steps = max_concurrent
        self._cv = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._frees: list = []
        self._closed = False
        self.ticks = 0  # ticks run so far (for tests and metrics)
        self.last_tick_rows = 0
        self.rows_avg = 0.0  # moving average of rows per tick
        self.running = 0  # rows of the tick being computed now (0 between ticks)
        self._awaiting: set[int] = set()  # ids of the states of the last tick that have not sent their next step
        self._gather_until = 0.0
        self._observers: list = []
        self._thread = threading.Thread(target=self._loop, name="stip-ticks", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ Engine, callable from any thread

    def new_state(self) -> Any:
        return self.engine.new_state()

    def length(self, state: Any) -> int:
        return self.engine.length(state)

    def free(self, state: Any, before=None) -> None:
        """Queued: the state is freed between ticks, never under a running forward. `before()`, if given, runs on the
        tick thread just before (the state then holds everything its steps wrote)."""
        with self._cv:
            self._frees.append((state, before))
            self._awaiting.discard(id(state))
            self._cv.notify()

    def submit(self, state: Any, embeds: torch.Tensor, all_positions: bool = False) -> Future:
        """Queue a step; the future gets its logits ([T, V] or [1, V], float32) or its exception."""
        job = _Job(state, embeds, all_positions)
        if embeds.ndim != 2 or embeds.shape[0] < 1:
            job.future.set_exception(ValueError(f"a step takes embeddings [T >= 1, d], got {list(embeds.shape)}"))
            return job.future
        with self._cv:
            if self._closed:
                raise RuntimeError("the scheduler was closed")
            self._jobs.append(job)
            self._awaiting.discard(id(state))
            self._cv.notify()
        return job.future

    def prefill(self, state: Any, embeds: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        return self.submit(state, embeds, all_positions).result()

    def decode(self, state: Any, embed: torch.Tensor) -> torch.Tensor:
        return self.submit(state, embed.reshape(1, -1)).result()

    def stats(self) -> dict:
        """For /health and /metrics: rows in the last tick, steps waiting for a tick, rows being computed now, ticks
        run, and the moving average of rows per tick. Counts only: nothing about any session."""
        inner = self.engine.stats()
        with self._cv:
            queue = len(self._jobs) - self.running
        return {**inner, "engine": self.name, "batch_size": self.last_tick_rows, "queue": max(0, queue),
                "running": self.running, "ticks": self.ticks, "rows_per_tick_avg": round(self.rows_avg, 3)}

    def add_tick_observer(self, observe) -> None:
        """`observe(rows)` after every tick, on the tick thread (the server's rows-per-tick histogram)."""
        self._observers.append(observe)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------ the tick thread

    def _plan(self) -> list[tuple[_Job, int]]:
        """This tick's (job, tokens): every decode, then prefill chunks within the token budget, in arrival order."""
        plan, budget = [], self.chunk_tokens
        for job in self._jobs:
            n = job.remaining
            if n > 1:
                n = min(n, budget)
                budget -= n
            if n > 0:
                plan.append((job, n))
        return plan

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._jobs or self._frees or self._closed):
                    self._cv.wait()
                while self._jobs and self._awaiting and not self._closed:
                    left = self._gather_until - time.perf_counter()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                if self._jobs:
                    self._awaiting.clear()  # whoever did not come back in time is not waited for again
                if self._closed:
                    for job in self._jobs:
                        job.future.set_exception(RuntimeError("the server is shutting down"))
                    self._jobs.clear()
                    return
                frees, self._frees = self._frees, []
                plan = self._plan()
            for state, before in frees:
                try:
                    if before is not None:
                        before()
                except Exception:  # noqa: BLE001 - an observer must not keep the state alive
                    log.exception("an observer of a freed state failed")
                try:
                    self.engine.free(state)
                except Exception:  # noqa: BLE001 - freeing must not stop the ticks
                    log.exception("freeing a session's state failed")
            if plan:
                self.running = len(plan)
                t0 = time.perf_counter()
                try:
                    self._tick(plan)
                except Exception as e:  # noqa: BLE001 - a bug here must fail these steps, not stop every session
                    log.exception("a tick failed")
                    self._finish([job for job, _ in plan], e)
                finally:
                    self.running = 0
                end = time.perf_counter()
                self._gather_until = end + min(self.gather_max_s, self.gather * (end - t0))

    def _tick(self, plan: list[tuple[_Job, int]]) -> None:
        steps = []
        for job, n in plan:
            last = n == job.remaining
            want = "all" if job.all_positions else ("last" if last else "none")
            steps.append(Step(job.state, job.embeds[job.done:job.done + n], want))
        try:
            results = self.engine.step_batch(steps)
        except Exception as e:  # noqa: BLE001 - an engine that raises for the whole tick fails every row
            results = [e] * len(steps)
        self.running = 0  # before any reply, so whoever sees the reply sees the tick over
        self.ticks += 1
        self.last_tick_rows = len(steps)
        self.rows_avg = len(steps) if self.ticks == 1 else (1 - ROWS_EMA) * self.rows_avg + ROWS_EMA * len(steps)
        for observe in self._observers:
            try:
                observe(len(steps))
            except Exception:  # noqa: BLE001 - metrics must not fail a tick
                log.exception("a tick observer failed")
        finished = []
        for (job, n), out in zip(plan, results):
            if isinstance(out, BaseException):
                job.future.set_exception(out)
                finished.append(job)
                continue
            job.done += n
            if job.all_positions:
                job.parts.append(out)
            if job.remaining == 0:
                finished.append(job)
                result = (job.parts[0] if len(job.parts) == 1 else torch.cat(job.parts)) if job.all_positions \
                    else out
                job.future.set_result(result)
        self._finish(finished)

    def _finish(self, jobs: list[_Job], error: BaseException | None = None) -> None:
        with self._cv:
            for job in jobs:
                if error is not None and not job.future.done():
                    job.future.set_exception(error)
                if job in self._jobs:
                    self._jobs.remove(job)
            pending = {id(job.state) for job in self._jobs}
            for job in jobs:  # their next steps are one round trip away (unless already here)
                if error is None and not job.future.exception() and id(job.state) not in pending:
                    self._awaiting.add(id(job.state))
