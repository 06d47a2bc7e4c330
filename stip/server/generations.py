"""The running /v1/generate streams of one context, by client: what `StipService.drop_revoked` cuts when a client's
key is revoked. Its own module so that the service and the route both import it, neither importing the other."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass(eq=False)  # compared by identity
class Generation:
    """One running generation: whose, and the event that cuts its stream."""

    owner: str
    cut: asyncio.Event = field(default_factory=asyncio.Event)


class Generations:
    """The running generations of one context, by client. On the event loop only."""

    def __init__(self):
        self._by_owner: dict[str, set[Generation]] = {}

    def owners(self) -> set[str]:
        return set(self._by_owner)

    def add(self, g: Generation) -> None:
        self._by_owner.setdefault(g.owner, set()).add(g)

    def discard(self, g: Generation) -> None:
        mine = self._by_owner.get(g.owner)
        if mine is not None:
            mine.discard(g)
            if not mine:
                del self._by_owner[g.owner]

    def cut(self, owner: str) -> int:
        """End every running stream of `owner` (its key was revoked); how many."""
        mine = self._by_owner.get(owner, set())
        for g in mine:
            g.cut.set()
        return len(mine)
