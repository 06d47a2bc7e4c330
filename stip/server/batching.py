"""The batched engine: many sessions' steps in one forward (`step_batch`), each session with its own KV cache.

Cache layout: one tensor per session, [layers, 2 (K, V), kv_heads, capacity, head_dim], grown by doubling (so
appending is amortised O(1) per token, where transformers' `DynamicCache` concatenates the whole cache every step),
never larger than the model's position limit. Sessions share no slot table, so a session joins or leaves at any
step without moving anyone else's cache. The forward itself is `stip.server.decoder.PackedDecoder`.

A bad row (a freed state, a wrong shape, a sequence past the model's limit) fails alone, before the forward; if the
batched forward itself raises, every row is retried alone so only the row at fault fails. A failed row leaves at
most junk beyond its session's length, which the next write overwrites.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stip.server.decoder import PackedDecoder, Row
from stip.server.engine import Engine, Step, TransformersEngine

MIN_CAPACITY = 64


@dataclass
class _Seq:
    kv: torch.Tensor | None = None
    length: int = 0
    freed: bool = field(default=False)


class BatchedEngine(Engine):
    """Packed continuous batching over a stock transformers model (decoder.FAMILIES)."""

    name = "transformers (batched)"
    last_rows = 0  # rows in the last step_batch
    # `stip serve --capture` (stip.server.capture): steps -> observe(layer, packed h) for one forward; None: off
    hidden_observer = None

    def __init__(self, model, manifest: dict | None = None):
        ref = TransformersEngine(model, manifest)  # same metadata as the serial engine
        self.model, self.manifest, self.config = ref.model, ref.manifest, ref.config
        self.model_type, self.hidden_size, self.vocab_size = ref.model_type, ref.hidden_size, ref.vocab_size
        self.dtype, self.device, self.max_positions = ref.dtype, ref.device, ref.max_positions
        self.kv_bytes_per_token = getattr(ref, "kv_bytes_per_token", 0)
        self.decoder = PackedDecoder(self.model)

    @classmethod
    def from_bundle(cls, bundle, dtype: torch.dtype = torch.float32, device: str = "cpu",
                    **load_kw) -> "BatchedEngine":
        from stip.server.model import load_protected_model

        model, manifest = load_protected_model(bundle, dtype=dtype, device=device, **load_kw)
        return cls(model, manifest)

    # ------------------------------------------------------------ per-session state

    def new_state(self) -> _Seq:
        return _Seq()

    def length(self, state: _Seq) -> int:
        return state.length

    def free(self, state: _Seq) -> None:
        state.kv, state.length, state.freed = None, 0, True

    def _reserve(self, seq: _Seq, needed: int) -> None:
        cap = 0 if seq.kv is None else seq.kv.shape[3]
        if needed <= cap:
            return
        new_cap = max(needed, 2 * cap, MIN_CAPACITY)
        if self.max_positions:
            new_cap = max(needed, min(new_cap, self.max_positions))
        kv = torch.empty(self.decoder.kv_shape(new_cap), dtype=self.dtype, device=self.device)
        if seq.kv is not None and seq.length:
            kv[:, :, :, :seq.length] = seq.kv[:, :, :, :seq.length]
        seq.kv = kv

    # ------------------------------------------------------------ steps

    def prefill(self, state: _Seq, embeds: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        return self._one(Step(state, embeds, "all" if all_positions else "last"))

    def decode(self, state: _Seq, embed: torch.Tensor) -> torch.Tensor:
        return self._one(Step(state, embed.reshape(1, -1), "last"))

    def _one(self, step: Step) -> torch.Tensor:
        out = self.step_batch([step])[0]
        if isinstance(out, BaseException):
            raise out
        return out

    def _check(self, step: Step) -> None:
        seq = step.state
        if not isinstance(seq, _Seq) or seq.freed:
            raise RuntimeError("session state was freed")
        x = step.embeds
        if x.ndim != 2 or x.shape[1] != self.hidden_size or x.shape[0] < 1:
            raise ValueError(f"a step takes embeddings [T >= 1, {self.hidden_size}], got {list(x.shape)}")
        if self.max_positions and seq.length + x.shape[0] > self.max_positions:
            raise ValueError(f"sequence would reach {seq.length + x.shape[0]} tokens; the model's limit is "
                             f"{self.max_positions}")
        if step.logits not in ("last", "all", "none"):
            raise ValueError(f"step.logits must be 'last', 'all' or 'none', got {step.logits!r}")

    def step_batch(self, steps: list[Step]) -> list[torch.Tensor | None | BaseException]:
        results: list = [None] * len(steps)
        good = []
        for i, step in enumerate(steps):
            try:
                self._check(step)
                if any(step.state is steps[j].state for j in good):
                    raise ValueError("a session may have only one step in a tick")
                good.append(i)
            except Exception as e:  # noqa: BLE001 - a bad row fails alone
                results[i] = e
        if not good:
            return results
        self.last_rows, self._running = len(good), len(good)
        try:
            outs = self._forward([steps[i] for i in good])
        except Exception as e:  # noqa: BLE001
            if len(good) == 1:
                results[good[0]] = e
                return results
            outs = []
            for i in good:  # retry alone: only the row at fault fails
                try:
                    outs.append(self._forward([steps[i]])[0])
                except Exception as e1:  # noqa: BLE001
                    outs.append(e1)
        self._running = 0
        for i, out in zip(good, outs):
            results[i] = out
        return results

    def stats(self) -> dict:
        return {**super().stats(), "batch_size": self.last_rows}

    def _forward(self, steps: list[Step]) -> list[torch.Tensor | None]:
        rows, keep, spans = [], [], []
        offset = 0
        for step in steps:
            seq, t = step.state, step.embeds.shape[0]
            self._reserve(seq, seq.length + t)
            rows.append(Row(seq.kv, seq.length, t))
            first = len(keep)
            if step.logits == "all":
                keep.extend(range(offset, offset + t))
            elif step.logits == "last":
                keep.append(offset + t - 1)
            spans.append((first, len(keep)))
            offset += t
        x = torch.cat([s.embeds for s in steps]).to(device=self.device, dtype=self.dtype)
        observe = self.hidden_observer(steps) if self.hidden_observer is not None else None
        logits = self.decoder.forward(x, rows, torch.tensor(keep, dtype=torch.long, device=self.device), observe)
        for step in steps:
            step.state.length += step.embeds.shape[0]
        logits = logits.float()
        return [logits[a:b] if b > a else None for a, b in spans]
