"""Several sessions at once: concurrent sessions' steps gathered into one batched step (continuous batching, as the
round-trip server's scheduler does), so that the worker gets one request per offloaded group and one body request
for all of them, and the enclave reads each weight once for all of them.

`StepBatcher` collects the steps the sessions' generations ask for and hands them to `EnclaveModel.step_batch` in
batches of at most `max_batch`. A batch starts once every session generating has a step waiting (the sessions of
the last batch come back within a few milliseconds), or `GATHER_S` after its first step, whichever is first; alone,
a session never waits. With more steps waiting than a batch holds, `fair_pick` chooses: one step per client per
round, the client served least recently first (FIFO within a client), so a client with many sessions gets one step
per batch like a client with one. Inside a batched step each session's block 0 runs on a thread of its own (its own
KV cache, its own attention) and `Tick` is where those threads meet at each offloaded group: the last to arrive sends
all their rows in one request (fresh pads for every row) and hands each its part.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

GATHER_S = 0.005  # how long a batch waits for the generating sessions' next steps
MAX_BATCH = 16  # sessions in one batched step (stip enclave --max-batch)


class Tick:
    """One batched step's meeting point: each offloaded group's rows from every session, one request for all."""

    def __init__(self, sessions: int):
        self._cond = threading.Condition()
        self._live = sessions  # sessions still running block 0
        self._arrived: dict[str, list] = {}  # group -> [(ticket, rows, module)]
        self._done: dict[int, torch.Tensor | BaseException] = {}
        self._tickets = 0

    def linear(self, module, rows: torch.Tensor) -> torch.Tensor:
        """This session's part of the group's product, once every live session has sent its rows."""
        with self._cond:
            ticket = self._tickets
            self._tickets += 1
            self._arrived.setdefault(module.key, []).append((ticket, rows, module))
            ready = self._take_ready(module.key)
        if ready:
            self._run(ready)
        with self._cond:
            while ticket not in self._done:
                self._cond.wait()
            out = self._done.pop(ticket)
        if isinstance(out, BaseException):
            raise out
        return out

    def leave(self) -> None:
        """This thread's session is through block 0 (or failed in it): the others stop waiting for it."""
        with self._cond:
            self._live -= 1
            ready = [r for r in (self._take_ready(k) for k in list(self._arrived)) if r]
        for r in ready:
            self._run(r)

    def _take_ready(self, key: str):
        arrived = self._arrived.get(key)
        if arrived and len(arrived) >= self._live:
            return self._arrived.pop(key)
        return None

    def _run(self, arrived: list) -> None:
        try:
            y = arrived[0][2].exchange(torch.cat([rows for _, rows, _ in arrived]))
            outs = list(y.split([rows.shape[0] for _, rows, _ in arrived]))
        except Exception as e:  # noqa: BLE001 - every session of this request fails with it
            outs = [e] * len(arrived)
        with self._cond:
            for (ticket, _, _), out in zip(arrived, outs):
                self._done[ticket] = out
            self._cond.notify_all()


@dataclass(eq=False)
class _Step:
    session: object
    ids: torch.Tensor
    client: str = "anonymous"
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None


class StepBatcher:
    """Gathers concurrent steps into `model.step_batch` calls on one thread of its own; counts batches and rows."""

    def __init__(self, model, max_batch: int = MAX_BATCH, gather_s: float = GATHER_S):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model, self.max_batch, self.gather_s = model, max_batch, gather_s
        self._cond = threading.Condition()
        self._pending: list[_Step] = []
        self._active = 0  # sessions generating now (`open` .. `close`)
        self._stop = False
        self.batches = self.steps = self.last_batch = 0
        self._last_served: dict[str, int] = {}  # client -> the batch it last had a step in
        self._thread = threading.Thread(target=self._loop, name="stip-enclave-batcher", daemon=True)
        self._thread.start()

    def open(self) -> None:
        """A generation starts: its steps are worth waiting for."""
        with self._cond:
            self._active += 1

    def close(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def step(self, session, ids, client: str = "anonymous") -> torch.Tensor:
        """The session's step in a coming batch: its plain logits [V] (or the step's own error, raised). `client`
        (stip.enclave.admission.client_id) is what the fair share counts in."""
        item = _Step(session, torch.as_tensor(ids, dtype=torch.long).reshape(-1), client)
        with self._cond:
            if self._stop:
                raise RuntimeError("the enclave is shutting down")
            self._pending.append(item)
            self._cond.notify_all()
        item.done.wait()
        if isinstance(item.result, BaseException):
            raise item.result
        return item.result

    def stats(self) -> dict:
        return {"max_batch": self.max_batch, "batches": self.batches, "steps": self.steps,
                "last_batch": self.last_batch, "mean_batch": self.steps / self.batches if self.batches else None}

    def shutdown(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    def _next_batch(self) -> list[_Step] | None:
        with self._cond:
            while not self._pending and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
            deadline = time.monotonic() + self.gather_s
            while len(self._pending) < max(self._active, 1) and not self._stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = fair_pick(self._pending, self._last_served, self.max_batch)
            self._pending = [p for p in self._pending if p not in batch]
            for b in batch:
                self._last_served[b.client] = self.batches + 1
            if len(self._last_served) > 4096:  # forget clients with nothing waiting
                waiting = {p.client for p in self._pending}
                self._last_served = {c: n for c, n in self._last_served.items() if c in waiting}
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                break
            try:
                results = self.model.step_batch([(b.session, b.ids) for b in batch])
            except Exception as e:  # noqa: BLE001 - the whole batch fails with it; the batcher goes on
                results = [e] * len(batch)
            self.batches += 1
            self.steps += len(batch)
            self.last_batch = len(batch)
            for b, r in zip(batch, results):
                b.result = r
                b.done.set()
        with self._cond:
            for b in self._pending:
                b.result = RuntimeError("the enclave is shutting down")
                b.done.set()


def fair_pick(pending: list, last_served: dict[str, int], n: int) -> list:
    """Up to `n` of the waiting steps (each with a `.client`): one per client per round, clients served least
    recently first (ties: the one waiting longest), FIFO within a client."""
    queues: dict[str, list] = {}
    for step in pending:
        queues.setdefault(step.client, []).append(step)
    order = sorted(queues, key=lambda c: last_served.get(c, 0))  # stable: ties keep the order of first arrival
    chosen: list = []
    depth = 0
    while len(chosen) < n and any(depth < len(queues[c]) for c in order):
        chosen += [queues[c][depth] for c in order if depth < len(queues[c])][:n - len(chosen)]
        depth += 1
    return chosen
