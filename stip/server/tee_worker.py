"""The GPU worker of TEE mode: the TEE worker bundle, split into what the enclave asks of it.

`stip serve DIR/server --tee-worker` loads the TEE worker bundle that `stip protect --tee` writes (and refuses any
other) and keeps three things: block 0's linear maps, stored in the enclave's secret bases (`W' = B W A^-1`), and,
for an untied model, the LM head (`W A^-1`), which it applies to the masked, padded rows the enclave sends (op
"linear"); and blocks 1..L-1 with one KV cache per session (op "body"; "bodies" runs several sessions' steps in one
packed forward, stip.server.decoder, as the round-trip server batches them), returning the last hidden state before
the final norm. The final norm, block 0's norms and non-linear parts and a tied model's LM head run in the enclave
(stip.enclave.compute). The worker holds nothing secret: no `p`, no `pc`, no embedding table (a tied model's LM head
is zeros in its bundle), no sealing key, no block 0 in the basis of `h1 p`; it sees masked padded inputs, `h1 p` and
the body's states.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from stip.common.tee.blocks import base_parts, offloadable, trimmed_config
from stip.common.tee.layout import GROUP_SEP, LM_HEAD, LM_HEAD_FIELD
from stip.common.tee.linalg import OFFLOAD_DTYPE, linear64, weight_of


MAX_CACHED_GROUPS = 8  # grouped linears ("q+k+v") whose concatenated weights are kept


class TeeWorkerError(Exception):
    """A request the worker refuses; `status` is the HTTP-like status of the error reply."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class BodySession:
    cache: object  # a DynamicCache (serial path) or the packed engine's per-session state
    position: int = 0
    touched: float = field(default_factory=time.monotonic)


def _packed_engine(model: nn.Module):
    """The round-trip server's batched engine over the body (blocks 1..L-1, no final norm, no LM head: its
    "logits" are the last hidden states), or None for a family it does not run (served one session at a time)."""
    from stip.errors import StipError
    from stip.server.batching import BatchedEngine

    try:
        engine = BatchedEngine(model)
    except StipError:
        return None
    engine.decoder.lm_head = nn.Identity()
    return engine


class TeeWorker:
    """Block 0's linears + the LM head (padded rows in, float64 products out) and blocks 1..L-1 (per session)."""

    def __init__(self, model: nn.Module, manifest: dict | None = None, max_sessions: int = 64,
                 max_seq_len: int = 4096, session_ttl: float = 300.0, kv_budget_tokens: int | None = None):
        self.manifest = manifest or {}
        self.max_sessions, self.session_ttl = max_sessions, session_ttl
        base, layers_attr, norm_attr = base_parts(model)
        layers = list(getattr(base, layers_attr))
        block0 = layers[0]
        # float64 copies: the padded products must be exact to float32 once the enclave subtracts W r
        self.linears: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for name in offloadable(block0):
            w, b = weight_of(block0.get_submodule(name))
            self.linears[name] = (w.detach().to(OFFLOAD_DTYPE), None if b is None else b.detach().to(OFFLOAD_DTYPE))
        if self.manifest.get(LM_HEAD_FIELD, "worker") == "worker":  # tied models: the enclave computes the logits
            head = model.get_output_embeddings()
            self.linears[LM_HEAD] = (head.weight.detach().to(OFFLOAD_DTYPE),
                                     None if head.bias is None else head.bias.detach().to(OFFLOAD_DTYPE))
        head = model.get_output_embeddings()
        if head is not None:  # zeros in a tied model's bundle, and never used here: free it
            head.weight = nn.Parameter(torch.empty(0, head.weight.shape[1], dtype=head.weight.dtype),
                                       requires_grad=False)
        self._single = len(self.linears)
        # The body: the same base model with block 0 and the final norm taken out, the blocks renumbered for a cache
        # of their own (a cache counts positions from its layer 0, which is now block 1).
        body = layers[1:]
        for i, layer in enumerate(body):
            for m in layer.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = i
        setattr(base, layers_attr, nn.ModuleList(body))
        setattr(base, norm_attr, nn.Identity())
        base.config = trimmed_config(base.config, 1, len(layers))
        model.config = base.config  # the body's own layer count and per-layer windows, for the packed engine
        self.base = base.eval()
        self.engine = _packed_engine(model)  # None: each session's body runs alone, with a DynamicCache
        self.hidden_size = int(getattr(base.config, "hidden_size", 0) or base.config.n_embd)
        limit = getattr(base.config, "max_position_embeddings", None)
        self.max_seq_len = min(max_seq_len, limit) if limit else max_seq_len
        self.kv_budget_tokens = kv_budget_tokens or max_sessions * self.max_seq_len  # all sessions' caches together
        self.sessions: dict[str, BodySession] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_bundle(cls, bundle: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", trusted=None,
                    **limits) -> "TeeWorker":
        from stip.server.model import load_protected_model

        model, manifest = load_protected_model(bundle, dtype=dtype, device=device, trusted=trusted, tee_worker=True)
        return cls(model, manifest, **limits)

    # ------------------------------------------------------------ ops

    def _resolve(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W, b) of one linear, or of a group "a+b+c" of linears with one input (their outputs side by side)."""
        if name in self.linears:
            return self.linears[name]
        parts = name.split(GROUP_SEP)
        unknown = next((p for p in parts if p not in self.linears), None)
        if unknown is not None or len(parts) < 2 or len(set(parts)) != len(parts):
            raise TeeWorkerError(404, f"unknown linear {(unknown or name)[:80]!r}; this worker offers block 0's "
                                      f"{', '.join(sorted(n for n in self.linears if GROUP_SEP not in n))} (a group joins names with "
                                      f"{GROUP_SEP!r})")
        ws = [self.linears[p] for p in parts]
        if len({int(w.shape[1]) for w, _ in ws}) != 1:
            raise TeeWorkerError(422, f"the linears of group {name[:80]!r} take inputs of different sizes")
        biases = [b if b is not None else torch.zeros(w.shape[0], dtype=OFFLOAD_DTYPE) for w, b in ws]
        both = (torch.cat([w for w, _ in ws]), None if all(b is None for _, b in ws) else torch.cat(biases))
        with self._lock:
            if len(self.linears) < self._single + MAX_CACHED_GROUPS:  # the enclave's few groups; not any ordering
                self.linears[name] = both
        return both

    def shape_of(self, name: str) -> tuple[int, int]:
        """(d_out, d_in) of a linear (or group) the enclave may ask for."""
        w = self._resolve(name)[0]
        return int(w.shape[0]), int(w.shape[1])

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        d_out, d_in = self.shape_of(name)
        if x.dim() != 2 or x.shape[1] != d_in:
            raise TeeWorkerError(422, f"linear {name!r} takes rows [n, {d_in}], got {list(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise TeeWorkerError(422, "input contains NaN or Inf values")
        w, b = self._resolve(name)
        return linear64(w, b, x)

    def body(self, session: str, h: torch.Tensor, start: int) -> torch.Tensor:
        """Blocks 1..L-1 on one session's rows h [T, d]: the hidden states of all T positions."""
        out = self.bodies([(session, h, start)], last_only=False)[0]
        if isinstance(out, BaseException):
            raise out
        return out

    @torch.no_grad()
    def bodies(self, spans: list[tuple[str, torch.Tensor, int]], last_only: bool = True) -> list:
        """Several sessions' steps (session, rows [T, d], start) in one packed forward where the family allows it;
        per span its hidden states ([1, d] the last, or [T, d]) or the TeeWorkerError that failed it alone."""
        results: list = [None] * len(spans)
        good: list[tuple[int, BodySession]] = []
        with self._lock:
            self._expire()
            held = sum(x.position for x in self.sessions.values())
            for i, (sid, h, start) in enumerate(spans):
                try:
                    s = self._admit(sid, h, start, held, [x for _, x in good])
                    held += h.shape[0]
                    good.append((i, s))
                except TeeWorkerError as e:
                    results[i] = e
        if not good:
            return results
        outs = self._forward([(spans[i], s) for i, s in good], last_only)
        for (i, s), out in zip(good, outs):
            if isinstance(out, BaseException):
                self.close(spans[i][0])  # the cache may hold part of the step
                results[i] = out if isinstance(out, TeeWorkerError) else \
                    TeeWorkerError(500, f"the body failed ({type(out).__name__})")
            else:
                s.position += spans[i][1].shape[0]
                s.touched = time.monotonic()
                results[i] = out
        return results

    def _admit(self, sid: str, h: torch.Tensor, start: int, held: int, taken: list) -> BodySession:
        """The session a span steps (created at start 0), after every check; holds self._lock."""
        if h.dim() != 2 or h.shape[1] != self.hidden_size or h.shape[0] < 1:
            raise TeeWorkerError(422, f"body takes hidden states [T, {self.hidden_size}] with T >= 1, "
                                      f"got {list(h.shape)}")
        if not bool(torch.isfinite(h).all()):
            raise TeeWorkerError(422, "hidden states contain NaN or Inf values")
        s = self.sessions.get(sid)
        if s is None:
            if start != 0:
                raise TeeWorkerError(404, f"unknown or expired session {sid[:40]!r}")
            if len(self.sessions) >= self.max_sessions:
                raise TeeWorkerError(503, f"all {self.max_sessions} sessions are in use; retry later")
            s = self.sessions[sid] = BodySession(self.engine.new_state() if self.engine is not None
                                                 else DynamicCache(config=self.base.config))
        if any(s is t for t in taken):
            raise TeeWorkerError(422, f"session {sid[:40]!r} appears twice in one request")
        if start != s.position:
            raise TeeWorkerError(409, f"session {sid[:40]!r} holds {s.position} tokens, but the step starts at "
                                      f"{start}")
        if s.position + h.shape[0] > self.max_seq_len:
            raise TeeWorkerError(413, f"sequence would reach {s.position + h.shape[0]} tokens; this worker's "
                                      f"max_seq_len is {self.max_seq_len}")
        if held + h.shape[0] > self.kv_budget_tokens:
            raise TeeWorkerError(503, f"the KV budget of {self.kv_budget_tokens} tokens is in use; retry later")
        return s

    def _forward(self, items: list, last_only: bool) -> list:
        """((session, h, start), BodySession) pairs -> per item its states or the exception that failed it."""
        if self.engine is not None:
            from stip.server.engine import Step

            steps = [Step(s.cache, h, "last" if last_only else "all") for (_, h, _), s in items]
            return self.engine.step_batch(steps)
        outs: list = []
        p = self.base.dtype if hasattr(self.base, "dtype") else torch.float32
        for (_, h, start), s in items:
            positions = torch.arange(start, start + h.shape[0], device=self.base.device)
            try:
                out = self.base(inputs_embeds=h.to(p)[None].to(self.base.device), past_key_values=s.cache,
                                use_cache=True, position_ids=positions[None], cache_position=positions)
                states = out.last_hidden_state[0].float().cpu()
                outs.append(states[-1:] if last_only else states)
            except Exception as e:  # noqa: BLE001 - this session alone fails
                outs.append(e)
        return outs

    def close(self, session: str) -> None:
        with self._lock:
            s = self.sessions.pop(session, None)
        if s is not None and self.engine is not None:
            self.engine.free(s.cache)

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [k for k, s in self.sessions.items() if now - s.touched > self.session_ttl]:
            s = self.sessions.pop(sid)
            if self.engine is not None:
                self.engine.free(s.cache)


class LocalWorkerLink:
    """The enclave's `WorkerLink` to a worker in the same process (tests, benchmarks without the socket)."""

    def __init__(self, worker: TeeWorker):
        self.worker = worker

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.worker.linear(name, x)

    def body(self, session: str, h: torch.Tensor, start: int) -> torch.Tensor:
        return self.worker.body(session, h, start)

    def bodies(self, spans: list[tuple[str, torch.Tensor, int]]) -> list:
        return self.worker.bodies(spans)

    def close(self, session: str) -> None:
        self.worker.close(session)
