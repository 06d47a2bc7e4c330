"""The LM head on the client (`stip protect --head client`, docs/head-client.md).

The server bundle then holds neither the embedding nor the LM head: the server returns each step's final normed
hidden state in the secret basis (the wire's hidden downlink), and the client multiplies it by the head its own
bundle holds. That head is the tensor the server would have held (rows in the server's permuted vocabulary order,
columns in the secret basis, a folded final norm included), so what comes out are the logits the server would have
sent, and everything after (un-permuting, sampling, log-probabilities, constrained decoding) runs unchanged: a
session turns the hidden rows into the logits or top-k reply its caller asked for (`ClientHead.reply`).

The head is float16 on disk and memory-mapped, not read: loading costs no memory, and its pages are the file's own
(shared between processes, dropped by the OS under pressure). Each step converts it to float32 a few MiB at a time and
multiplies in float32, so the only rounding beyond float32 arithmetic is the head's own float16 storage. numpy
only: the light client computes the logits with the same code as the full install.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stip.client.tables import map_matrix
from stip.common.arrays import like, to_numpy
from stip.errors import KeyMismatchError

CHUNK_BYTES = 4 << 20  # float32 rows converted per matmul: fits a core's cache (measured best of 1-16 MiB)


def map_float16(path: Path, name: str = "weight") -> np.memmap:
    """A float16 matrix of a safetensors file, memory-mapped (copy-on-write, never written)."""
    return map_matrix(path, name, dtypes=("F16",))[0]


class ClientHead:
    """The client's LM head: `logits(hidden)` in the server's vocabulary order, and `reply` to turn a hidden-state
    reply into the logits or top-k reply a session's caller asked for."""

    def __init__(self, path: str | Path, softcap: float | None = None):
        self.path = Path(path)
        self.mapped = map_float16(self.path)
        self.weight = self.mapped  # [V, d] float16, the file's pages (no copy)
        self.softcap = float(softcap) if softcap else None  # Gemma's final_logit_softcapping, as its model does
        self.wire_dtype = "float32"  # what the hidden downlink asks for: "float32", or "float16" (half the bytes)

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    def downlink(self) -> dict:
        """The wire downlink a session sends instead of its caller's (stip.common.wire)."""
        return {"kind": "hidden", "dtype": self.wire_dtype}

    def logits(self, hidden):
        """hidden [n, d] (any float dtype; numpy or torch) -> float32 logits [n, V], in the server's permuted
        vocabulary order (in the type of `hidden`)."""
        h = to_numpy(hidden, np.float32).reshape(-1, self.hidden_size)
        vocab, d = self.weight.shape
        rows = max(1, min(vocab, CHUNK_BYTES // (4 * d)))
        out = np.empty((vocab, h.shape[0]), dtype=np.float32)
        block, ht = np.empty((rows, d), dtype=np.float32), np.ascontiguousarray(h.T)
        for a in range(0, vocab, rows):
            b = min(vocab, a + rows)
            block[:b - a] = self.weight[a:b]
            np.matmul(block[:b - a], ht, out=out[a:b])
        logits = np.ascontiguousarray(out.T)
        if self.softcap:
            logits = np.tanh(logits / np.float32(self.softcap)) * np.float32(self.softcap)
        return like(logits, hidden)

    def reply(self, hidden, kind: str, k: int, targets):
        """(logits, indices, values, logsumexp, target logits) as `stip.client.replies.check_reply` gives them for a
        `kind` ("logits" or "topk") reply, computed here from the hidden rows the server sent, as the server would
        have (stip.server.step_request.reply_parts)."""
        logits = to_numpy(self.logits(hidden))
        picked = None
        if targets is not None:
            at = to_numpy(targets).astype(np.int64).reshape(-1)
            rows = logits[np.arange(len(at)), np.maximum(at, 0)]
            picked = np.where(at >= 0, rows, np.float32(0)).astype(np.float32)
        if kind == "logits":
            return logits, None, None, None, picked
        values, indices = topk(logits, min(int(k), self.vocab_size))
        return None, indices, values, logsumexp(logits), picked


def topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, indices) of the k largest of each row, largest first (ties: lower index first)."""
    k = min(int(k), x.shape[-1])
    part = np.argpartition(-x, k - 1, axis=-1)[..., :k] if k < x.shape[-1] else \
        np.broadcast_to(np.arange(x.shape[-1]), x.shape)
    vals = np.take_along_axis(x, part, -1)
    order = np.lexsort((part, -vals), axis=-1)
    idx = np.take_along_axis(part, order, -1).astype(np.int64)
    return np.take_along_axis(x, idx, -1), idx


def logsumexp(x: np.ndarray) -> np.ndarray:
    """Each row's logsumexp, float32 (computed in float64)."""
    m = x.max(axis=-1, keepdims=True).astype(np.float64)
    return (np.log(np.exp(x - m).sum(axis=-1)) + m[..., 0]).astype(np.float32)


def check_placement(where: str, served: str | None, head: ClientHead | None, bundle_path=None) -> None:
    """Refuse a server whose LM head placement (its hello or /v1/info "head") is not this client's: a bundle of
    another `stip protect` run that reused the key (same bundle id, same signer)."""
    served = served or "server"
    mine = "client" if head is not None else "server"
    if served == mine:
        return
    bundle = f"this client bundle ({bundle_path})" if bundle_path else "this client"
    if served == "client":
        raise KeyMismatchError(f"the server at {where} holds no LM head (its bundle was protected with --head "
                               f"client) and returns hidden states, but {bundle} holds no "
                               f"head to compute logits with: use the client bundle of the server's `stip protect` "
                               f"run")
    raise KeyMismatchError(f"{bundle} holds the LM head (--head client), but the server at "
                           f"{where} holds one too and returns logits: use the server bundle of the same `stip "
                           f"protect --head client` run")

