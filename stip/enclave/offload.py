"""The enclave's offload of one linear map to the worker (Slalom): a fresh pad per call, the input mask `A` on the
way out, `B^-1` and the pad's product `W r` taken off on the way back (docs/tee.md, "The split"). And the link to
the worker, timed, and a tied model's LM head, computed in the enclave instead.

Pads and their products `W r` come from the group's pool (stip.enclave.pads: precomputed in the background, each
row used once), or are made inline when it is dry. Each entry is `N(0, 1) x PAD_SCALE x B`, with `B` a constant
per offloaded group (the calibrated bound on its input rows' RMS, stip.enclave.compute): a pad scaled by each row's
own RMS would carry that RMS in the padded row's norm, which the worker sees (bench/tee_extraction.py measured 13x
chance token recovery from it).
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

import torch
from torch import nn

from stip.common.tee.layout import GROUP_SEP
from stip.common.tee.linalg import OFFLOAD_DTYPE, Monomial
from stip.enclave.pads import PAD_SCALE, Pads  # noqa: F401 - re-exported


class WorkerLink(Protocol):
    """The enclave's only way to the worker (stip.server.tee_worker: in process, or over its WebSocket)."""

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """`W x + b` for block 0's linear `name` (or "lm_head") on padded rows x [n, d_in] -> [n, d_out]."""

    def body(self, session: str, h: torch.Tensor, start: int) -> torch.Tensor:
        """Blocks 1..L-1 on h [T, d] at positions start.. with the session's KV cache -> the last hidden state."""

    def bodies(self, spans: list[tuple[str, torch.Tensor, int]]) -> list:
        """Several sessions' (session, h, start) in one request -> per span its last state [1, d] or its error."""

    def close(self, session: str) -> None:
        """Free the session's KV cache at the worker."""


class OffloadedLinear(nn.Module):
    """Stands in for one linear map of block 0 (or the LM head): the worker computes `W' A (x + r)` with its masked
    copy `W' = B W A^-1`, the enclave applies `B^-1` and subtracts `W r` (from the pad pool). In a group
    (`SHARED_INPUT`) the first member called computes the whole group in one request; the others take their part
    when called with the same tensor. In a batched step (stip.enclave.batch) each session's block 0 runs on a thread
    of its own, and the call waits for the other sessions' rows so that one request carries them all. `a`: the
    group's input mask; `b`: its outputs' masks side by side (None: identity)."""

    def __init__(self, name: str, weight: torch.Tensor, link: WorkerLink, pads: Pads,
                 group: list[tuple[str, torch.Tensor, torch.Tensor | None]] | None = None,
                 waiting: "PerThread | None" = None, a: Monomial | None = None, b: Monomial | None = None,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.name, self.link, self.pads, self.a, self.b = name, link, pads, a, b
        # B^-1 as a gather (x[i] = y[inv[i]] / scale[inv[i]], the reciprocals exact: scales are +-2^k)
        self.b_inv = None if b is None else (torch.argsort(b.perm), (1.0 / b.scale)[torch.argsort(b.perm)])
        group = group or [(name, weight, bias)]
        self.names = [n for n, _, _ in group]
        self.key = GROUP_SEP.join(self.names)  # the worker's name for the group's request
        self.sizes = [int(w.shape[0]) for _, w, _ in group]
        self.weight64 = torch.cat([w.detach().to(OFFLOAD_DTYPE) for _, w, _ in group])  # [sum out, in]
        # the group's biases, for `calibrate` only (the worker adds B b itself)
        self.bias64 = torch.cat([torch.zeros(w.shape[0], dtype=OFFLOAD_DTYPE) if b_ is None else
                                 b_.detach().to(OFFLOAD_DTYPE) for _, w, b_ in group])
        self.out_features = int(weight.shape[0])
        self.waiting = waiting if waiting is not None else PerThread()  # name -> (input, its output), this step
        self.bound: float | None = None  # B: the group's input RMS bound, set by `calibrate`
        self.calibrating: list[float] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hit = self.waiting.pop(self.name, None)
        if hit is not None and hit[0] is x:
            return hit[1]
        rows = x.reshape(-1, x.shape[-1]).to(OFFLOAD_DTYPE)
        if self.calibrating is not None:  # the enclave's own exact product, no worker, no pad
            self.calibrating.append(float(rows.pow(2).mean(-1).sqrt().max()))
            y = rows @ self.weight64.t() + self.bias64
        else:
            tick = getattr(CURRENT, "tick", None)
            y = self.exchange(rows) if tick is None else tick.linear(self, rows)
        parts = y.to(x.dtype).split(self.sizes, dim=-1)
        mine = None
        for name, part in zip(self.names, parts):
            part = part.reshape(*x.shape[:-1], part.shape[-1])
            if name == self.name:
                mine = part
            else:
                self.waiting[name] = (x, part)
        return mine

    def exchange(self, rows: torch.Tensor) -> torch.Tensor:
        """`W rows^T` (float64 [n, sum out]) through the worker: pad, mask, send; unmask, subtract `W r`."""
        if self.bound is None:
            raise RuntimeError(f"{self.name}: pads are not calibrated (EnclaveModel calibrates at start)")
        r, wr = self.pads.take(self.key, self.weight64, self.bound, rows.shape[0])
        sent = rows + r
        y = self.link.linear(self.key, sent if self.a is None else self.a.apply(sent)).to(OFFLOAD_DTYPE)
        if self.b_inv is not None:
            inv, rscale = self.b_inv
            y = y.index_select(-1, inv) * rscale
        y = y - wr
        r.zero_()  # used once: destroyed
        wr.zero_()
        return y


class PerThread(threading.local):
    """A dict of its own in every thread: a group's parts waiting for their members, per session's block 0."""

    def __init__(self):
        self.d: dict = {}

    def pop(self, key, default=None):
        return self.d.pop(key, default)

    def __setitem__(self, key, value) -> None:
        self.d[key] = value

    def clear(self) -> None:
        self.d.clear()


CURRENT = threading.local()  # .tick: the batched step this thread's session belongs to (stip.enclave.batch)


class LocalLinear(nn.Module):
    """A tied model's LM head, computed in the enclave: its weight is the embedding table (in `pc` and `p`), which
    the worker must not hold in any form.

    Kept as `W^T` [in, out], contiguous: one row times it reads `W` in order, about twice as fast on a CPU as the
    product over `W` [out, in] (SmolLM2's 49152 x 576 head, one MKL thread: 6.5 ms against 11.7 ms per row). From
    `FEW_ROWS` rows up (a batched step) the product over `W` is the faster one (8 rows: 33 ms against 41 ms); it
    is used when `table` (the enclave's embedding table) equals `W` and so costs no memory."""

    FEW_ROWS = 3

    def __init__(self, weight: torch.Tensor, table: torch.Tensor | None = None):
        super().__init__()
        w = weight.detach().float()
        self.weight_t = w.t().contiguous()
        self.weight = table if table is not None and table.shape == w.shape and torch.equal(table, w) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.weight is not None and x.numel() > self.FEW_ROWS * x.shape[-1]:
            return x @ self.weight.t()
        return x @ self.weight_t


class TimedLink:
    """Counts the time spent waiting on the worker (the rest of a step is enclave time)."""

    def __init__(self, link: WorkerLink):
        self.link, self.seconds = link, 0.0

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0

    def linear(self, name, x):
        return self._timed(self.link.linear, name, x)

    def body(self, session, h, start):
        return self._timed(self.link.body, session, h, start)

    def bodies(self, spans):
        return self._timed(self.link.bodies, spans)

    def close(self, session):
        return self.link.close(session)
