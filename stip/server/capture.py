"""`stip serve --capture DIR`: record what the server receives, for `stip audit` (docs/audit.md).

For every step a session sends (prefill or decode, round-trip mode), the server writes the rows it received
(`inputs`, [T, d], in the protected basis) and the hidden states after the chosen decoder layers (`hidden.L`,
[T, d], the residual stream after layer L) to `DIR/NNNNNN.safetensors`, then appends one line to `DIR/index.jsonl`:
{"seq", "file", "session" (a number counting sessions from 0, not the session's id), "kind", "start", "rows"}.
Each file is written atomically before its index line, so a reader never sees a line without its file.

Off by default, and then free: the engine is not wrapped and no hook is installed. On, it is an audit tool, not a
production mode: everything a client sends is kept on disk (owner-only files), which the server announces with a
WARNING at start. Log lines never contain the tensors.

Where the hidden states come from: the batched engine's packed forward calls an observer after each layer with the
packed tokens of every session in the tick, which is cut back into each step's rows (`BatchedEngine.hidden_observer`);
the serial engine gets forward hooks on its decoder layers. Both are the states the server computed, not a replay.
A server-decode bundle (token ids in, stip.server.decoding) is recorded the same way: `inputs` is then the server's
own embedding rows of the ids it received (what its first layer reads; the ids map to them one to one), and a decode
step is recorded as a one-row "prefill" (the engine appends it as one).
`stip serve --tee-worker --capture DIR` writes the same folder format (stip.server.tee_capture): `inputs` is then
`h1 p`, the body's input, and each step may carry `offload.<linear>` tensors besides.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

from stip.common.files import write_bytes_atomic
from stip.errors import StipError
from stip.server.engine import Engine

log = logging.getLogger("stip.server")

INDEX_FILE = "index.jsonl"


def parse_layers(text: str | None) -> list[int] | None:
    """"0,15,-1" -> [0, 15, -1]; None or "" -> None (the default layers)."""
    if text is None or not str(text).strip():
        return None
    try:
        return [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise StipError(f"--capture-layers takes comma-separated layer indices (e.g. 0,15,29), got {text!r}") from None


def default_layers(n_layers: int) -> list[int]:
    """The first, the middle and the last decoder layer."""
    return sorted({0, n_layers // 2, n_layers - 1})


def resolve_layers(layers: list[int] | None, n_layers: int) -> list[int]:
    """Layer indices within [0, n_layers) (negative ones count from the end), sorted, without repeats."""
    if layers is None:
        return default_layers(n_layers)
    out = set()
    for layer in layers:
        i = layer + n_layers if layer < 0 else layer
        if not 0 <= i < n_layers:
            raise StipError(f"--capture-layers: layer {layer} is out of range; the model has {n_layers} decoder "
                            f"layers (0..{n_layers - 1}, or -1 for the last)")
        out.add(i)
    return sorted(out)


def decoder_layers(model) -> list:
    """The decoder blocks of a transformers causal LM (`model.layers`, or GPT-2's `transformer.h`)."""
    base = getattr(model, "base_model", model)
    for name in ("layers", "h"):
        blocks = getattr(base, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            return list(blocks)
    raise StipError(f"--capture: cannot find the decoder layers of {type(model).__name__}")


def check_folder(folder: str | Path) -> Path:
    """A capture goes to a new or empty folder (its numbering starts at 0)."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise StipError(f"--capture {folder}: the folder exists and is not empty; give a new or empty one "
                        f"(a capture's numbering starts at 0)")
    return folder


class CaptureWriter:
    """Numbers the files and sessions and writes them; thread-safe (batched steps finish on several threads)."""

    def __init__(self, folder: str | Path):
        self.folder = check_folder(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        self._lock = threading.Lock()
        self._seq = 0
        self._sessions: dict[int, int] = {}  # id(state) -> session number, until the state is freed
        self._next_session = 0

    @staticmethod
    def _key(state: Any) -> Any:
        """A session's key: an engine's state object by identity; a TEE worker's session id (a string) by value."""
        return state if isinstance(state, str) else id(state)

    def session(self, state: Any) -> int:
        with self._lock:
            key = self._key(state)
            if key not in self._sessions:
                self._sessions[key] = self._next_session
                self._next_session += 1
            return self._sessions[key]

    def forget(self, state: Any) -> None:
        with self._lock:
            self._sessions.pop(self._key(state), None)

    def write(self, state: Any, kind: str, start: int, inputs: torch.Tensor, hidden: dict[int, torch.Tensor],
              extra: dict[str, torch.Tensor] | None = None, extra_meta: dict[str, Any] | None = None) -> None:
        """One step's file and index line. `extra`: more tensors, stored in their own dtype (the TEE worker's
        float64 padded rows); `extra_meta`: more keys for the index line."""
        from safetensors.torch import save

        session = self.session(state)
        tensors = {"inputs": inputs.detach().to("cpu", torch.float32).contiguous().clone()}
        for layer, h in hidden.items():
            tensors[f"hidden.{layer}"] = h.detach().to("cpu", torch.float32).contiguous().clone()
        for name, t in (extra or {}).items():
            tensors[name] = t.detach().to("cpu").contiguous().clone()
        with self._lock:
            seq = self._seq
            self._seq += 1
            name = f"{seq:06d}.safetensors"
            meta = {"seq": seq, "file": name, "session": session, "kind": kind, "start": int(start),
                    "rows": int(inputs.shape[0]), **(extra_meta or {})}
            write_bytes_atomic(self.folder / name,
                               save(tensors, metadata={k: str(v) for k, v in meta.items()}), mode=0o600)
            fd = os.open(self.folder / INDEX_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (json.dumps(meta) + "\n").encode())
            finally:
                os.close(fd)


class _Pending:
    """Hidden states of steps in flight: state -> layer -> {start position: rows}. A chunk recomputed after a failed
    batched forward overwrites its earlier copy (same start)."""

    def __init__(self, layers: list[int]):
        self.layers = set(layers)
        self._lock = threading.Lock()
        self._by_state: dict[int, dict[int, dict[int, torch.Tensor]]] = {}

    def add(self, state: Any, layer: int, start: int, rows: torch.Tensor) -> None:
        with self._lock:
            self._by_state.setdefault(id(state), {}).setdefault(layer, {})[start] = rows.detach().float().clone()

    def take(self, state: Any) -> dict[int, torch.Tensor]:
        with self._lock:
            got = self._by_state.pop(id(state), {})
        return {layer: torch.cat([chunks[s] for s in sorted(chunks)]) for layer, chunks in sorted(got.items())}


class CapturingEngine(Engine):
    """Wraps the server's engine: every prefill/decode is recorded with its hidden states once it has run."""

    def __init__(self, engine: Engine, writer: CaptureWriter, layers: list[int]):
        self.engine, self.writer, self.layers = engine, writer, layers
        for name in ("hidden_size", "vocab_size", "model_type", "max_positions", "dtype", "manifest",
                     "kv_bytes_per_token", "concurrent_steps", "name"):
            if hasattr(engine, name):
                setattr(self, name, getattr(engine, name))
        self.pending = _Pending(layers)
        self._serial_state: Any = None  # the serial engine's step in flight (it runs one at a time)
        self._install_hooks(engine)

    def __getattr__(self, name):  # anything else the server asks of its engine (add_tick_observer, ...)
        engine = self.__dict__.get("engine")
        if engine is None:
            raise AttributeError(name)
        return getattr(engine, name)

    def _install_hooks(self, engine: Engine) -> None:
        from stip.server.batching import BatchedEngine
        from stip.server.engine import TransformersEngine

        inner = engine
        while not isinstance(inner, (BatchedEngine, TransformersEngine)) and getattr(inner, "engine", None):
            inner = inner.engine
        if isinstance(inner, BatchedEngine):
            inner.hidden_observer = self._packed_observer
        elif isinstance(inner, TransformersEngine):
            for i, block in enumerate(decoder_layers(inner.model)):
                if i in self.pending.layers:
                    block.register_forward_hook(self._serial_hook(i, inner))
        else:
            raise StipError(f"--capture runs on the transformers engine only, not {type(inner).__name__}")

    def _packed_observer(self, steps) -> Any:
        """For one packed forward: observe(layer, h [1, N, d]) files each step's rows under its session."""
        spans, a = [], 0
        for step in steps:
            t = int(step.embeds.shape[0])
            spans.append((step.state, a, t, int(step.state.length)))
            a += t

        def observe(layer: int, h: torch.Tensor) -> None:
            if layer in self.pending.layers:
                for state, a, t, start in spans:
                    self.pending.add(state, layer, start, h[0, a:a + t])
        return observe

    def _serial_hook(self, layer: int, inner):
        def hook(_module, _args, output):
            state = self._serial_state
            if state is not None:
                h = output[0] if isinstance(output, tuple) else output
                self.pending.add(state, layer, inner.length(state), h[0])
        return hook

    def _run(self, kind: str, state: Any, embeds: torch.Tensor, call) -> Any:
        start = self.engine.length(state)
        self._serial_state = state
        try:
            out = call()
        except BaseException:
            self.pending.take(state)
            raise
        finally:
            self._serial_state = None
        self.writer.write(state, kind, start, embeds, self.pending.take(state))
        return out

    def prefill(self, state: Any, embeds: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        return self._run("prefill", state, embeds, lambda: self.engine.prefill(state, embeds, all_positions))

    def decode(self, state: Any, embed: torch.Tensor) -> torch.Tensor:
        return self._run("decode", state, embed.reshape(1, -1), lambda: self.engine.decode(state, embed))

    def new_state(self) -> Any:
        return self.engine.new_state()

    def length(self, state: Any) -> int:
        return self.engine.length(state)

    def free(self, state: Any) -> None:
        self.writer.forget(state)
        self.pending.take(state)
        self.engine.free(state)

    def step_batch(self, steps):
        return self.engine.step_batch(steps)

    def stats(self) -> dict:
        return self.engine.stats()

    def close(self) -> None:
        self.engine.close()


def enable_capture(engine, folder: str | Path, layers: list[int] | None):
    """Wrap `engine` (a round-trip decoder engine) so that it records every step to `folder`; warns loudly. A
    server-decode engine on ours (stip.server.decoding) is returned with its inner engine wrapped: it records the
    server's own embedding rows of the ids it received."""
    from stip.server.engine import TokenEngine

    if isinstance(engine, TokenEngine):
        if not hasattr(engine, "wrap"):
            raise StipError(f"--capture runs on the transformers engine only, not {type(engine).__name__}")
        engine.wrap(lambda inner: enable_capture(inner, folder, layers))
        return engine
    from stip.common.tasks import TEXT_GENERATION

    if getattr(engine, "task", TEXT_GENERATION) != TEXT_GENERATION:
        raise StipError(f"--capture records text-generation sessions; this bundle is a {engine.task} model")
    inner = engine
    while getattr(inner, "engine", None) is not None:
        inner = inner.engine
    model = getattr(inner, "model", None)
    if model is None:
        raise StipError(f"--capture runs on the transformers engine only, not {type(inner).__name__}")
    n_layers = len(decoder_layers(model))
    chosen = resolve_layers(layers, n_layers)
    writer = CaptureWriter(folder)
    wrapped = CapturingEngine(engine, writer, chosen)
    log.warning("capture is ON: every input row the server receives is written to %s, with the hidden states after "
                "layers %s. This is for auditing (stip audit); never run it in production.", writer.folder,
                ",".join(map(str, chosen)))
    return wrapped
