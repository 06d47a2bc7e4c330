"""The LM head on the client (`stip protect --head client`, docs/head-client.md).

The server bundle then holds neither the embedding nor the LM head: the server returns each step's final normed
hidden state in the secret basis (the wire's hidden downlink), and the client multiplies it by the head its own
bundle holds. That head is the tensor the server would have held (rows in the server's permuted vocabulary order,
columns in the secret basis, a folded final norm included), so what comes out are the logits the server would have
sent, and everything after (un-permuting, sampling, log-probabilities, constrained decoding) runs unchanged: a
session turns the hidden rows into the logits or top-k reply its caller asked for (`ClientHead.reply`).

The head is float16 on disk and memory-mapped, not read: loading costs no memory, and its pages are the file's own
(shared between processes, dropped by the OS under pressure). Each step converts it to float32 a few MiB at a time and
multiplies in float32, so the only rounding beyond float32 arithmetic is the head's own float16 storage.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import torch

from stip.errors import BundleError, KeyMismatchError

CHUNK_BYTES = 4 << 20  # float32 rows converted per matmul: fits a core's cache (measured best of 1-16 MiB)


def map_float16(path: Path, name: str = "weight") -> np.memmap:
    """A float16 matrix of a safetensors file, memory-mapped (copy-on-write, never written): the file's header (a
    little-endian u64 length, then JSON naming each tensor's dtype, shape and byte range after the header) says
    where it lies. safetensors' own loaders copy the data into memory, which is what this avoids."""
    if sys.byteorder != "little":
        raise BundleError("the client's LM head is mapped as little-endian float16; this machine is big-endian")
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        entry = header[name]
        rows, cols = (int(x) for x in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise BundleError(f"{path} is not a safetensors file holding a matrix {name!r}: {e}") from None
    if entry.get("dtype") != "F16" or end - begin != rows * cols * 2:
        raise BundleError(f"{path}: {name!r} must be float16 [V, d], got {entry.get('dtype')} {entry['shape']}")
    if path.stat().st_size < 8 + n + end:
        raise BundleError(f"{path} is shorter than its header says")
    return np.memmap(path, dtype="<f2", mode="c", offset=8 + n + begin, shape=(rows, cols))


class ClientHead:
    """The client's LM head: `logits(hidden)` in the server's vocabulary order, and `reply` to turn a hidden-state
    reply into the logits or top-k reply a session's caller asked for."""

    def __init__(self, path: str | Path, softcap: float | None = None):
        self.path = Path(path)
        self.mapped = map_float16(self.path)
        self.weight = torch.from_numpy(self.mapped)  # [V, d] float16, the file's pages (no copy)
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

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, d] (any float dtype) -> float32 logits [n, V], in the server's permuted vocabulary order."""
        h = hidden.detach().float().reshape(-1, self.hidden_size)
        vocab, d = self.weight.shape
        rows = max(1, min(vocab, CHUNK_BYTES // (4 * d)))
        out = torch.empty(vocab, h.shape[0])
        block, ht = torch.empty(rows, d), h.T.contiguous()
        with torch.inference_mode():
            for a in range(0, vocab, rows):
                b = min(vocab, a + rows)
                block[:b - a].copy_(self.weight[a:b])
                torch.mm(block[:b - a], ht, out=out[a:b])
        logits = out.T.contiguous()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def reply(self, hidden: torch.Tensor, kind: str, k: int, targets: torch.Tensor | None):
        """(logits, indices, values, logsumexp, target logits) as `stip.client.replies.check_reply` gives them for a
        `kind` ("logits" or "topk") reply, computed here from the hidden rows the server sent, as the server would
        have (stip.server.step_request.reply_parts)."""
        logits = self.logits(hidden)
        picked = None
        if targets is not None:
            at = targets.reshape(-1).long()
            rows = logits[torch.arange(len(at)), at.clamp(min=0)]
            picked = torch.where(at >= 0, rows, torch.zeros_like(rows))
        if kind == "logits":
            return logits, None, None, None, picked
        values, indices = torch.topk(logits, min(int(k), self.vocab_size), dim=-1)
        return None, indices, values, torch.logsumexp(logits, dim=-1), picked


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

