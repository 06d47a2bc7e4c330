"""Admission control: a global KV-token budget, per-client quotas, and the bound on all-position logits.

Every token a session holds in its KV cache costs `Engine.kv_bytes_per_token` bytes. The server admits a step only
after reserving its tokens here (on the event loop, before the step reaches the worker thread), so steps queued
concurrently can never overshoot the budget together; a session's reservation is released when it is freed.

Refusals carry their HTTP status as data (`REFUSALS`): the server being full is 503 (retry later, someone else holds
the memory), a client over its own quota is 429 (it must close sessions or slow down), a context whose key has served
its rekey budget is 403 (no retry helps until the key is replaced; `stip.server.key_usage`).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

# reason -> HTTP status of the refusal
REFUSALS = {
    "server_sessions": 503,  # every session slot on the server is taken
    "kv_budget": 503,  # the global KV-token budget is spent
    "client_sessions": 429,  # this client holds its max_sessions
    "client_tokens": 429,  # this client's sessions hold its max_tokens
    "client_rate": 429,  # this client ran its max_tokens_per_minute
    "rekey_budget": 403,  # the context's key served its `--rekey-after` tokens (stip.server.key_usage)
}

DEFAULT_MEMORY_FRACTION = 0.5  # of the memory still available once the model is loaded
RATE_WINDOW = 60.0


class AdmissionError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.status = reason, REFUSALS[reason]


@dataclass(frozen=True)
class Quota:
    """One client's limits; None means only the server's own limits apply."""

    max_sessions: int | None = None
    max_tokens: int | None = None  # KV tokens held at once, over all the client's sessions
    max_tokens_per_minute: int | None = None


@dataclass
class Usage:
    sessions: int = 0
    tokens: int = 0  # reserved KV tokens
    recent: collections.deque = field(default_factory=collections.deque)  # (time, tokens) of the last minute


def default_budget_tokens(kv_bytes_per_token: int, ceiling_tokens: int, device: str = "cpu",
                          fraction: float = DEFAULT_MEMORY_FRACTION) -> int:
    """A fraction of the memory available now (call after the model is loaded), in KV tokens, capped at
    `ceiling_tokens` (max_sessions x max_seq_len: more could never be used)."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
    else:
        import psutil

        free = psutil.virtual_memory().available
    return max(1, min(ceiling_tokens, int(free * fraction) // max(1, kv_bytes_per_token)))


class Admission:
    """Reservations of KV tokens and session slots, globally and per client. Runs on the event loop only."""

    def __init__(self, budget_tokens: int, max_sessions: int, kv_bytes_per_token: int = 0):
        self.total, self.max_sessions, self.kv_bytes_per_token = budget_tokens, max_sessions, kv_bytes_per_token
        self.used = 0
        self.sessions = 0
        self.clients: dict[str, Usage] = collections.defaultdict(Usage)

    def usage(self, client: str) -> Usage:
        return self.clients.get(client) or Usage()

    def open_session(self, client: str, quota: Quota) -> None:
        u = self.clients[client]
        if quota.max_sessions is not None and u.sessions >= quota.max_sessions:
            raise AdmissionError("client_sessions", f"too many sessions for this client: it holds its quota of "
                                                    f"{quota.max_sessions}; close a session before opening another")
        if self.sessions >= self.max_sessions:
            raise AdmissionError("server_sessions", f"server full: too many sessions (the server holds its limit of "
                                                    f"{self.max_sessions}); retry later (Retry-After: 5)")
        u.sessions += 1
        self.sessions += 1

    def close_session(self, client: str, tokens: int) -> None:
        u = self.clients[client]
        u.sessions -= 1
        self.sessions -= 1
        self.release(client, tokens)
        if u.sessions == 0 and u.tokens == 0 and not u.recent:
            del self.clients[client]

    def reserve(self, client: str, quota: Quota, n: int, now: float | None = None) -> None:
        """Reserve `n` more KV tokens for one of `client`'s sessions, or refuse (nothing is reserved then)."""
        u = self.clients[client]
        if quota.max_tokens is not None and u.tokens + n > quota.max_tokens:
            raise AdmissionError("client_tokens", f"token quota exceeded: this client's sessions would hold "
                                                  f"{u.tokens + n} KV tokens, over its quota of {quota.max_tokens}; "
                                                  f"close sessions or send a shorter prompt")
        if quota.max_tokens_per_minute is not None:
            now = time.monotonic() if now is None else now
            while u.recent and now - u.recent[0][0] > RATE_WINDOW:
                u.recent.popleft()
            spent = sum(k for _, k in u.recent)
            if spent + n > quota.max_tokens_per_minute:
                wait, left = RATE_WINDOW, spent  # until enough of the minute's tokens leave the window
                for t, k in u.recent:
                    left -= k
                    if left + n <= quota.max_tokens_per_minute:
                        wait = RATE_WINDOW - (now - t)
                        break
                raise AdmissionError("client_rate", f"rate limit: this client sent {spent} tokens in the last "
                                                    f"minute; {n} more would pass its quota of "
                                                    f"{quota.max_tokens_per_minute} per minute; retry in "
                                                    f"{max(1, round(wait))} s")
        if self.used + n > self.total:
            raise AdmissionError("kv_budget", f"server full: {n} more KV tokens would pass the server's KV budget "
                                              f"({self.used} of {self.total} tokens in use); retry later "
                                              f"(Retry-After: 5) or send a shorter prompt")
        u.tokens += n
        self.used += n
        if quota.max_tokens_per_minute is not None:
            u.recent.append((now, n))

    def release(self, client: str, n: int) -> None:
        if n:
            self.clients[client].tokens -= n
            self.used -= n
