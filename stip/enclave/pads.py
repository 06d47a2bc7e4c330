"""The enclave's pad pool (Slalom's precomputation): pads `r` and their products `W r` made ahead of time by a
background thread, so that a step costs the enclave one addition and one subtraction per offloaded linear instead
of a matmul.

Each offloaded group (q/k/v, o, gate/up, down, an untied LM head) has a `PadPool` of rows `r` (entries
`N(0, 1) x PAD_SCALE x B`, `B` the group's calibrated bound) with `r @ W^T` beside them. A step takes as many rows as
it sends; a row is handed out once, its storage in the pool is zeroed as it is copied out, and the taker zeroes its
copy after use. When a pool has fewer rows than a step needs, the rest are computed inline, on the step's critical
path, and counted as misses. One `PadFiller` thread refills all pools in batches (a matmul of many rows reads `W`
once: far cheaper per row than the step's own single-row product) at a lowered thread priority, from a generator
reseeded from `os.urandom` for every batch, while the enclave is idle: between steps, and while a step waits for the
worker's body. Pool sizes follow the measured rate: each pool holds what the last seconds' consumption would use in
`HORIZON_S` seconds, at least twice the largest recent step (a burst of prompts, remembered with a half-life of
`PEAK_HALF_LIFE_S`), within `MIN_ROWS` and a memory cap shared by the pools (`POOL_BYTES`).
"""

from __future__ import annotations

import collections
import os
import threading
import time

import torch

from stip.common.tee.linalg import OFFLOAD_DTYPE

PAD_SCALE = 2.0**20  # pad entries ~ N(0, 1) x this x the group's input bound B (docs/tee.md: averaging)
POOL_BYTES = 256 << 20  # all pools' rows (r and W r, float64) together
MIN_ROWS, INITIAL_ROWS = 64, 256  # rows a pool keeps at least / at start (before any rate is measured)
HORIZON_S = 2.0  # a pool holds this many seconds of the measured consumption
PEAK_HALF_LIFE_S = 60.0  # and twice its largest take (a burst of prompts), remembered with this half-life
FILL_BATCH = 32  # rows per background matmul
RESIZE_S = 1.0  # how often the filler re-measures the rates
FILLER_NICE = 10  # the filler thread's nice value above the enclave process's: the steps' critical path comes first


def draw(shape, bound: float, gen: torch.Generator) -> torch.Tensor:
    """A pad of `shape`, `N(0, 1) x PAD_SCALE x bound`: the same scale for every row, whatever the row holds."""
    return torch.randn(shape, generator=gen, dtype=OFFLOAD_DTYPE) * (PAD_SCALE * bound)


def fresh_generator() -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


class PadPool:
    """One offloaded group's precomputed rows (r, W r). Thread-safe; counts hits and misses in rows."""

    def __init__(self, name: str, weight64: torch.Tensor, bound: float, max_rows: int):
        self.name, self.weight64, self.bound = name, weight64, bound
        self.max_rows = max(1, max_rows)
        self.capacity = min(INITIAL_ROWS, self.max_rows)
        self._chunks: collections.deque[tuple[torch.Tensor, torch.Tensor]] = collections.deque()
        self._offset = 0  # rows of the first chunk already handed out
        self.level = self.hits = self.misses = 0
        self._window, self.peak, self.rate = 0, 0.0, 0.0  # rows taken since the last resize, largest take, rows/s
        self.last = 0  # rows of the latest take (a step's)
        self._lock = threading.Lock()

    def make(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        r = draw((n, self.weight64.shape[1]), self.bound, gen)
        return r, r @ self.weight64.t()

    def put(self, r: torch.Tensor, wr: torch.Tensor) -> None:
        with self._lock:
            self._chunks.append((r, wr))
            self.level += r.shape[0]

    def take(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """n rows (r, W r), each used by nobody before; how many came from the pool (the rest computed inline)."""
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        with self._lock:
            got = 0
            while got < n and self._chunks:
                r, wr = self._chunks[0]
                k = min(n - got, r.shape[0] - self._offset)
                sl = slice(self._offset, self._offset + k)
                parts.append((r[sl].clone(), wr[sl].clone()))
                r[sl].zero_()  # destroyed in the pool as it is handed out
                wr[sl].zero_()
                got += k
                self._offset += k
                if self._offset == r.shape[0]:
                    self._chunks.popleft()
                    self._offset = 0
            self.level -= got
            self.hits += got
            self.misses += n - got
            self._window += n
            self.peak, self.last = max(self.peak, n), n
        if got < n:
            parts.append(self.make(n - got, gen))
        if len(parts) == 1:
            return parts[0][0], parts[0][1], got
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), got

    def resize(self, elapsed: float) -> None:
        """Capacity from the rows taken over the last `elapsed` seconds (smoothed) and the largest recent take (a
        burst of prompts, remembered for minutes: bursts recur, and a pool sized only by the rate would meet the
        next one short)."""
        with self._lock:
            self.rate = 0.5 * self.rate + 0.5 * self._window / max(elapsed, 1e-3)
            want = max(self.rate * HORIZON_S, 2 * self.peak, MIN_ROWS)
            self.capacity = int(min(self.max_rows, want))
            self._window, self.peak = 0, self.peak * 0.5 ** (elapsed / PEAK_HALF_LIFE_S)

    def need(self) -> int:
        with self._lock:
            return self.capacity - self.level

    def urgent(self) -> bool:
        """Fewer rows left than two steps like the latest would take: the next steps would miss."""
        with self._lock:
            return self.level < 2 * max(1, self.last)


class PadFiller:
    """The background thread that keeps every pool topped up (the emptiest, relative to its capacity, first).

    It fills while the enclave is idle: between steps and while a step waits for the worker's body (`release`), not
    while a step computes here (`hold`): the pads are then off the critical path in time as well as in work, as in
    Slalom, and the step's own work waits neither for the filler's matmuls nor for the interpreter lock. Only a pool
    about to run dry (fewer rows than two of its largest recent takes) is refilled during a step."""

    def __init__(self, pools: list[PadPool]):
        self.pools = pools
        self._cond = threading.Condition()
        self._busy = self._stop = False
        self._thread = threading.Thread(target=self._run, name="stip-pad-filler", daemon=True)
        self._thread.start()

    def hold(self) -> None:
        """A step computes in the enclave: fill only what is urgent."""
        with self._cond:
            self._busy = True

    def release(self) -> None:
        """The enclave is idle (between steps, or waiting for the worker): fill. The thread is woken only when a pool
        lacks a whole batch (or is about to run dry), not for every row taken: each wake-up costs the step a
        context switch; in between it fills what is missing when it wakes on its own (every `RESIZE_S`)."""
        with self._cond:
            self._busy = False
            if any(p.need() >= min(FILL_BATCH, p.capacity) or p.urgent() for p in self.pools):
                self._cond.notify()

    def poke(self) -> None:
        """A pool was drawn from during a step and is about to run dry: refill now."""
        with self._cond:
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _next(self, last: float) -> tuple[PadPool | None, float]:
        """The pool to fill next (None: stop), waiting while every pool is full or a step's work comes first."""
        with self._cond:
            while not self._stop:
                now = time.monotonic()
                if now - last >= RESIZE_S:
                    for p in self.pools:
                        p.resize(now - last)
                    last = now
                needs = [(p.need() / max(1, p.capacity), p) for p in self.pools]
                frac, pool = max(needs, key=lambda t: t[0]) if needs else (0.0, None)
                if pool is not None and frac > 0 and (not self._busy or pool.urgent()):
                    return pool, last
                self._cond.wait(timeout=RESIZE_S)
        return None, last

    def _run(self) -> None:
        try:  # Linux: a thread's own nice value, FILLER_NICE above the process's (never below it, even as root)
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + FILLER_NICE))
        except (AttributeError, OSError):
            pass
        last = time.monotonic()
        while True:
            pool, last = self._next(last)
            if pool is None:
                return
            with torch.no_grad():
                pool.put(*pool.make(min(FILL_BATCH, pool.need()), fresh_generator()))


class Pads:
    """All of an enclave's pads: the generator for pads made inline (reseeded from `os.urandom` for every step,
    `fresh`), and, once `start_pools` ran, one pool per offloaded group and their filler."""

    def __init__(self):
        self.gen = torch.Generator()
        self.fresh()
        self.pools: dict[str, PadPool] = {}
        self.filler: PadFiller | None = None

    def fresh(self) -> None:
        self.gen.manual_seed(int.from_bytes(os.urandom(8), "little"))

    def draw(self, shape, bound: float) -> torch.Tensor:
        return draw(shape, bound, self.gen)

    def start_pools(self, groups: list[tuple[str, torch.Tensor, float]], pool_bytes: int = POOL_BYTES) -> None:
        """One pool per (name, W [out, in] float64, bound), sharing `pool_bytes`; 0: no pools (all inline)."""
        if pool_bytes <= 0 or not groups:
            return
        row_bytes = sum((w.shape[0] + w.shape[1]) * w.element_size() for _, w, _ in groups)
        max_rows = max(1, pool_bytes // row_bytes)
        self.pools = {name: PadPool(name, w, bound, max_rows) for name, w, bound in groups}
        self.filler = PadFiller(list(self.pools.values()))

    def take(self, name: str, weight64: torch.Tensor, bound: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n pad rows and their products for the group `name`: from its pool, the rest (or all, without pools)
        computed here."""
        pool = self.pools.get(name)
        if pool is None:
            r = draw((n, weight64.shape[1]), bound, self.gen)
            return r, r @ weight64.t()
        r, wr, _ = pool.take(n, self.gen)
        if pool.urgent():
            self.filler.poke()
        return r, wr

    def hold(self) -> None:
        """A step starts computing in the enclave (the filler waits, unless a pool is about to run dry)."""
        if self.filler is not None:
            self.filler.hold()

    def release(self) -> None:
        """The enclave waits for the worker's body or is between steps: the filler refills the pools."""
        if self.filler is not None:
            self.filler.release()

    def stats(self) -> dict:
        """Rows handed out from the pools (hits) and computed inline because a pool was dry (misses), all groups."""
        pools = list(self.pools.values())
        hits, misses = sum(p.hits for p in pools), sum(p.misses for p in pools)
        return {"pools": len(pools), "hits": hits, "misses": misses,
                "hit_rate": hits / (hits + misses) if hits + misses else None,
                "ready_rows": sum(p.level for p in pools), "capacity_rows": sum(p.capacity for p in pools)}

    def close(self) -> None:
        if self.filler is not None:
            self.filler.close()
