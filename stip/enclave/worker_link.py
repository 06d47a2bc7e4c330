"""The enclave's `WorkerLink` over the worker's WebSocket (`stip serve --tee-worker`, stip.server.tee_route).

One socket, requests answered in order; a lock makes it safe for several enclave sessions on threads. Everything the
enclave sends goes through `_call`, so `sent` hooks (tests) see every tensor the worker receives.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import torch

from stip.common import wire
from stip.common.ws import legacy_kw
from stip.errors import StipError

TEE_WORKER_PATH = "/v1/tee/worker"
_DTYPES = {**wire.DTYPES, "float64": torch.float64}
_NAMES = {v: k for k, v in _DTYPES.items()}


class WorkerError(StipError):
    """The worker refused a request or went away."""


class WebSocketWorkerLink:
    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0, ssl_context=None,
                 sent: Callable[[dict, torch.Tensor | None], None] | None = None):
        from websockets.sync.client import connect

        ws_url = url.rstrip("/").replace("https://", "wss://", 1).replace("http://", "ws://", 1) + TEE_WORKER_PATH
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            self._ws = connect(ws_url, additional_headers=headers, compression=None, max_size=None,
                               open_timeout=timeout, ssl=ssl_context,
                               **legacy_kw(connect))
        except Exception as e:  # noqa: BLE001 - name the worker and the cause, no traceback for the operator
            raise WorkerError(f"cannot open the TEE worker socket at {ws_url}: {e}") from None
        self.timeout, self.sent = timeout, sent
        self._lock = threading.Lock()
        self.worker_ms = 0.0  # compute time the worker reports (the rest of a call's time is the channel)
        self.calls_s = 0.0
        self.batched: bool | None = None  # whether the worker answers "bodies" (learnt from "info")

    def _call(self, header: dict, x: torch.Tensor | None = None) -> tuple[dict, memoryview]:
        if x is not None:
            header = {**header, "dtype": _NAMES[x.dtype], "shape": [int(n) for n in x.shape]}
        if self.sent is not None:
            self.sent(header, x)
        frame = wire.encode_frame(header, *(() if x is None else (wire.tensor_bytes(x),)))
        t0 = time.perf_counter()
        with self._lock:
            try:
                self._ws.send(frame)
                reply = self._ws.recv(timeout=self.timeout)
            except Exception as e:  # noqa: BLE001
                raise WorkerError(f"the TEE worker went away: {type(e).__name__}: {e}") from None
        self.calls_s += time.perf_counter() - t0
        head, payload = wire.decode_frame(reply)
        if not head.get("ok"):
            raise WorkerError(f"the TEE worker refused {header.get('op')}: {head.get('status')} {head.get('error')}")
        self.worker_ms += float(head.get("worker_ms", 0.0))
        return head, payload

    def _tensor(self, head: dict, payload: memoryview) -> torch.Tensor:
        return wire.tensor_from_bytes(payload, _DTYPES[head["dtype"]], head["shape"])

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self._tensor(*self._call({"op": "linear", "name": name}, x.contiguous()))

    def body(self, session: str, h: torch.Tensor, start: int) -> torch.Tensor:
        return self._tensor(*self._call({"op": "body", "session": session, "start": int(start)},
                                        h.float().contiguous()))

    def bodies(self, spans: list[tuple[str, torch.Tensor, int]]) -> list:
        """Several sessions' steps in one request: per span its last hidden state [1, d] or the WorkerError that
        failed it alone (a worker without "bodies": one "body" request per span)."""
        if self.batched is None:
            self.info()
        if not self.batched:
            return [_or_error(lambda sp=sp: self.body(*sp)[-1:]) for sp in spans]
        h = torch.cat([x.float() for _, x, _ in spans]).contiguous()
        head, payload = self._call({"op": "bodies", "spans": [[sid, int(start), int(x.shape[0])]
                                                              for sid, x, start in spans]}, h)
        rows = self._tensor(head, payload)
        out: list = [WorkerError("the TEE worker did not answer for this session")] * len(spans)
        for k, i in enumerate(head.get("index", [])):
            out[i] = rows[k:k + 1]
        for f in head.get("failed", []):
            out[f["index"]] = WorkerError(f"the TEE worker refused body: {f.get('status')} {f.get('error')}")
        return out

    def close(self, session: str) -> None:
        self._call({"op": "close", "session": session})

    def info(self) -> dict:
        """The worker's bundle id and where the LM head runs ("worker" or "enclave")."""
        head, _ = self._call({"op": "info"})
        self.batched = "bodies" in head.get("ops", ())
        return {"bundle_id": head.get("bundle_id"), "lm_head": head.get("lm_head")}

    def expect_bundle(self, bundle_id: str, lm_head_in_enclave: bool) -> None:
        """Refuse a worker that serves another protection run's bundle: its block 0 would be in other secret bases
        and every answer garbage."""
        info = self.info()
        if info["bundle_id"] != bundle_id or info["lm_head"] != ("enclave" if lm_head_in_enclave else "worker"):
            raise WorkerError(f"the TEE worker serves bundle {str(info['bundle_id'])[:16]}... (LM head at the "
                              f"{info['lm_head']}), this enclave's bundle is {bundle_id[:16]}...: serve the DIR/server "
                              "that the same `stip protect --tee` run wrote with --tee-worker")

    def shutdown(self) -> None:
        self._ws.close()


def _or_error(fn):
    try:
        return fn()
    except WorkerError as e:
        return e
