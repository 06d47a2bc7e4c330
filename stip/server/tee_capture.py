"""`stip serve --tee-worker --capture DIR`: record what the TEE worker receives, for the audit (bench/audit_tee.py).

The folder format is round-trip capture's (stip.server.capture, read back by stip.audit.capture): one file and one
index line per step the enclave runs. In a TEE worker's capture:

- `inputs` is `h1 p`, the body's input rows (block 0's output, computed in the enclave), [T, d];
- `hidden.L` is the residual stream after decoder layer L, in the model's own numbering: `hidden.0` is `h1 p`
  itself (block 0 runs in the enclave; the worker receives its output rather than computing it), `hidden.L` for
  L >= 1 the state the worker computed after block L (its body's block L - 1);
- `offload.<linear>` are the masked padded rows `A (x + r)` that step sent to an offloaded linear (block 0's groups,
  and an untied LM head), float64 as received; the index line lists them under "offload" ({name: rows});
- the index line carries "source": "tee-worker".

The enclave runs one step at a time over one socket, so on a connection the linear requests that come before a
body request belong to that body's step, and an LM-head request after it too: a step is written when the next
step's first block-0 linear arrives, when its session is closed, or when the socket goes away. A failed body
request drops its step. Off by default, and then nothing is hooked; on, it keeps everything on disk (owner-only)
and warns at start, like round-trip capture.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

import torch

from stip.common.tee.layout import LM_HEAD
from stip.server.capture import CaptureWriter, resolve_layers

log = logging.getLogger("stip.server")

SOURCE = "tee-worker"  # the index lines' "source"
OFFLOAD_PREFIX = "offload."


class TeeCapture:
    """Hooks on the worker's body blocks (only those of the chosen layers) and the writer; one recorder per
    socket (`connection()`)."""

    def __init__(self, worker, writer: CaptureWriter, layers: list[int]):
        self.writer, self.layers = writer, layers
        self._lock = threading.Lock()  # one body forward collected at a time
        self._collected: dict[int, torch.Tensor] | None = None
        blocks = list(getattr(worker.base, _layers_attr(worker.base)))
        for layer in layers:
            if layer >= 1:  # block L of the model is the body's block L - 1
                blocks[layer - 1].register_forward_hook(self._hook(layer))

    def _hook(self, layer: int):
        def hook(_module, _args, output):
            if self._collected is not None:
                h = output[0] if isinstance(output, tuple) else output
                self._collected[layer] = h[0].detach().float().cpu().clone()
        return hook

    def run_body(self, run: Callable[[], torch.Tensor], h1: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """`run()` (the worker's body forward) and the hidden states after the chosen layers, layer 0 being `h1`."""
        with self._lock:
            self._collected = {}
            try:
                out = run()
                hidden = self._collected
            finally:
                self._collected = None
        if 0 in self.layers:
            hidden[0] = h1.detach().float().cpu().clone()
        return out, dict(sorted(hidden.items()))

    def connection(self) -> "TeeConnectionRecorder":
        return TeeConnectionRecorder(self)


class TeeConnectionRecorder:
    """One enclave socket's steps: block-0 linear rows, then the body's rows and states, then an LM-head row."""

    def __init__(self, capture: TeeCapture):
        self.capture = capture
        self._lock = threading.Lock()
        self._offload: dict[str, list[torch.Tensor]] = {}
        self._body: tuple[str, int, torch.Tensor, dict] | None = None

    def linear(self, name: str, x: torch.Tensor) -> None:
        """A linear request the worker answered: its padded rows, as received (float64)."""
        with self._lock:
            if name != LM_HEAD and self._body is not None:  # the next step's block 0 began
                self._flush_locked()
            self._offload.setdefault(name, []).append(x.detach().cpu().clone())

    def body(self, session: str, start: int, h1: torch.Tensor, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run the body (`run`), recording its input rows and states; a failed step is dropped with its rows."""
        try:
            out, hidden = self.capture.run_body(run, h1)
        except BaseException:
            with self._lock:
                self._offload, self._body = {}, None
            raise
        with self._lock:
            if self._body is not None:
                self._flush_locked()
            self._body = (session, int(start), h1.detach().float().cpu().clone(), hidden)
        return out

    def close(self, session: str | None = None) -> None:
        """The session (or, None, the socket) ended: write what is pending and forget the session's number."""
        with self._lock:
            self._flush_locked()
        if session is not None:
            self.capture.writer.forget(session)

    def _flush_locked(self) -> None:
        body, offload = self._body, self._offload
        self._body, self._offload = None, {}
        if body is None:
            if offload:
                log.debug("tee capture: %d linear requests without a body step, not recorded", len(offload))
            return
        session, start, h1, hidden = body
        extra = {OFFLOAD_PREFIX + name: torch.cat(parts) for name, parts in offload.items()}
        kind = "decode" if start > 0 and h1.shape[0] == 1 else "prefill"
        self.capture.writer.write(
            session, kind, start, h1, hidden,
            extra=extra, extra_meta={"source": SOURCE, "offload": {n: int(t.shape[0]) for n, t in extra.items()}})


def _layers_attr(base) -> str:
    for name in ("layers", "h"):
        if isinstance(getattr(base, name, None), torch.nn.ModuleList):
            return name
    raise ValueError(f"cannot find the body blocks of {type(base).__name__}")


def enable_tee_capture(worker, folder: str | Path, layers: list[int] | None) -> TeeCapture:
    """Record every step the worker runs to `folder` (a new or empty one); warns loudly. Layers count the whole
    model's blocks (block 0, in the enclave, then the worker's body); default: the first, the middle, the last."""
    worker.engine = None  # the serial body: the packed forward calls a block's parts, not the block's hooks
    n_layers = 1 + len(getattr(worker.base, _layers_attr(worker.base)))
    chosen = resolve_layers(layers, n_layers)
    capture = TeeCapture(worker, CaptureWriter(folder), chosen)
    log.warning("capture is ON: every row the TEE worker receives (h1 p, and the padded rows of block 0's linears) "
                "is written to %s, with the hidden states after layers %s. This is for auditing; never run it in "
                "production.", capture.writer.folder, ",".join(map(str, chosen)))
    return capture
