"""What vLLM's two engines (`stip.server.vllm_engine`, `stip.server.vllm_round_trip`) share: vLLM's `AsyncLLM`, its
scheduler counts, the prefix-cache salts and the engine's sizes and statistics.

vLLM's `AsyncLLM` runs on an event loop of its own thread (`_VllmLoop`), so the server's worker threads (round-trip)
and its event loop (server-decode) both reach it.

vLLM's prefix cache is shared by every request it runs, so a client could time whether another client sent a
prefix. Every request carries a `cache_salt` (`CacheSalts`): blocks are reused only between requests of one API key,
or, for the shared principals (the single --token, anonymous loopback), within one session or request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import threading
from pathlib import Path

import torch

from stip.errors import StipError
from stip.server.auth import ANONYMOUS, TOKEN_CLIENT
from stip.server.engine import kv_bytes_per_token
from stip.server.vllm_options import _import_vllm, engine_args

log = logging.getLogger("stip.server")

SHARED_PRINCIPALS = (TOKEN_CLIENT, ANONYMOUS)  # one name for many users: no prefix shared beyond a session


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
