"""Session bookkeeping: random ids, owners, idle expiry. The engine state (KV cache) hangs off each session.

All methods run on the event loop (no locks needed); freeing a KV cache (and returning its reserved tokens to the
budget, `stip.server.budget`) is the caller-supplied `free` callback's job. Limits on how many sessions may exist
are admission control's (`Admission.open_session`), checked before `create`.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Session:
    id: str
    state: Any
    owner: str = ""  # the client (API key name) that created it; only it may resume or use it
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    position: int = 0  # tokens in the KV cache
    reserved: int = 0  # KV tokens reserved in the budget: position, plus those of a step in flight
    attached: bool = False  # a socket is serving this session now
    busy: bool = False  # a step is running in the worker
    closed: bool = False  # freed (closed, expired, or broken): every later use answers 404
    closed_by: str = ""  # why: "revoked" (its key was), else "" (a step queued behind the close says which)

    def touch(self) -> None:
        self.last_used = time.monotonic()


class SessionManager:
    def __init__(self, new_state: Callable[[], Any], free: Callable[[Session], None], ttl: float):
        self._new_state, self._free = new_state, free
        self.ttl = ttl
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def kv_caches(self) -> int:
        return sum(1 for s in self._sessions.values() if s.position > 0)

    @property
    def kv_tokens(self) -> int:
        return sum(s.position for s in self._sessions.values())

    def owners(self) -> set[str]:
        return {s.owner for s in self._sessions.values()}

    def owned_by(self, owner: str) -> list[Session]:
        return [s for s in self._sessions.values() if s.owner == owner]

    def create(self, owner: str = "") -> Session:
        sid = secrets.token_urlsafe(24)
        s = self._sessions[sid] = Session(sid, self._new_state(), owner)
        return s

    def get(self, sid: str, owner: str | None = None) -> Session | None:
        """The live session `sid`; None if unknown, expired, or (with `owner`) created by another client."""
        s = self._sessions.get(sid)
        if s is not None and owner is not None and s.owner != owner:
            return None
        if s is not None and self._expired(s):
            self.remove(s)
            return None
        return s

    def remove(self, s: Session, why: str = "") -> None:
        if self._sessions.get(s.id) is s:
            del self._sessions[s.id]
        if not s.closed:
            s.closed, s.closed_by = True, why
            s.position = 0
            self._free(s)

    def _expired(self, s: Session, now: float | None = None) -> bool:
        return not s.busy and (now or time.monotonic()) - s.last_used > self.ttl

    def expire(self) -> int:
        """Drop every idle session past its TTL; the number dropped."""
        now = time.monotonic()
        stale = [s for s in self._sessions.values() if self._expired(s, now)]
        for s in stale:
            self.remove(s)
        return len(stale)

    def clear(self) -> None:
        for s in list(self._sessions.values()):
            self.remove(s)
