"""Prometheus metrics of one server process (a private registry, so several apps in one process never collide).

Only counts, sizes and timings: no tensor values, no session ids. The engine's figures (`Engine.stats`: rows per
tick, steps waiting, steps running) are read when /metrics is scraped; the rows-per-tick histogram is fed by the
scheduler after every tick. Per context only the tokens its key has served (`stip.server.key_usage`), labelled by
bundle id.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from stip.server.budget import REFUSALS

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0)
TICK_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
KV_TOKEN_BUCKETS = tuple(2 ** i for i in range(4, 18))  # 16 .. 131072


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, sessions: Callable[[], int], kv_caches: Callable[[], int], kv_tokens: Callable[[], int],
                 kv_reserved: Callable[[], int] = lambda: 0, kv_budget: Callable[[], int] = lambda: 0,
                 engine_stats: Callable[[], dict] = dict):
        r = self.registry = CollectorRegistry(auto_describe=True)
        Gauge("stip_sessions_active", "Open sessions (attached to a socket or waiting to be resumed)",
              registry=r).set_function(sessions)
        Gauge("stip_kv_caches_live", "Sessions currently holding a KV cache", registry=r).set_function(kv_caches)
        Gauge("stip_kv_cache_tokens", "Tokens held in all KV caches", registry=r).set_function(kv_tokens)
        Gauge("stip_kv_budget_used_tokens", "KV tokens reserved against the budget (held, plus steps in flight)",
              registry=r).set_function(kv_reserved)
        Gauge("stip_kv_budget_tokens", "The server's KV-token budget", registry=r).set_function(kv_budget)
        self.refused = Counter("stip_admission_refused", "Requests refused by admission control, by reason",
                               ["reason"], registry=r)
        self.tokens = Counter("stip_tokens_processed", "Tokens run through the model", ["phase"], registry=r)
        self.steps = Histogram("stip_step_seconds", "Server compute time of one step (forward + downlink encoding)",
                               ["op"], buckets=STEP_BUCKETS, registry=r)
        self.errors = Counter("stip_errors", "Error replies, by status", ["status"], registry=r)
        self.sessions_opened = Counter("stip_sessions_opened", "Sessions created", registry=r)
        self.sessions_closed = Counter("stip_sessions_closed", "Sessions ended, by reason", ["reason"], registry=r)
        self.bytes = Counter("stip_wire_bytes", "Frame bytes on the session sockets", ["direction"], registry=r)
        self.context_tokens = Counter(
            "stip_context_tokens_served", "Tokens a context's key has served (session rows, server-decode prompt and "
            "generated tokens, encode rows; with --usage-file, counted from the file's saved count), by bundle id",
            ["bundle"], registry=r)
        self.rekey_after = Gauge("stip_rekey_after_tokens", "Tokens a context may serve before it takes no new "
                                 "sessions (stip serve --rekey-after; 0: no budget)", registry=r)
        for phase in ("prefill", "decode"):
            self.tokens.labels(phase)
            self.steps.labels(phase)
        for direction in ("in", "out"):
            self.bytes.labels(direction)
        for reason in REFUSALS:
            self.refused.labels(reason)
        first = engine_stats()
        Info("stip_engine", "The engine serving this process and its mode", registry=r).info(
            {"engine": str(first.get("engine", "unknown")), "mode": str(first.get("mode", "round-trip"))})
        for key, doc in (("batch_size", "Rows (sessions or sequences) in the engine's last tick or step"),
                         ("queue", "Steps or requests waiting for the engine"),
                         ("running", "Steps or requests being computed now"),
                         ("prefix_cache_hit_tokens", "Prompt tokens served from the engine's prefix cache so far "
                          "(vLLM; shared only within one API key)")):
            Gauge(f"stip_engine_{key}", doc, registry=r).set_function(lambda key=key: engine_stats().get(key, 0))
        self.tick_rows = Histogram("stip_engine_tick_rows", "Rows per engine tick (one batched forward)",
                                   buckets=TICK_ROW_BUCKETS, registry=r)
        self.generation_kv_tokens = Histogram(
            "stip_generation_kv_tokens", "Tokens a server-decode generation's KV cache held when it ended (the "
            "engine's own count; never more than the generation reserved)", buckets=KV_TOKEN_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
