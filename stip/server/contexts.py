"""Several protected contexts served side by side by one server process (`stip serve DIR1/server DIR2/server`).

A context is one `stip protect` (or `stip rekey`) run: its own key, its own permuted weights, its own bundle id.
Different keys cannot share weights or a batch, so each context keeps its own engine (one model in memory each), its
own batching scheduler, worker threads and sessions. What is the server's, not a context's, is shared: the API keys,
the session limit (`--max-sessions`) and the KV budget with every client's quota, and /metrics.

Every request names its context by bundle id in the `X-STIP-Bundle` header (`stip.client.transport.Connection` sends
its client bundle's id). A request without the header goes to the only context of a single-bundle server, so older
clients keep working there; a several-context server answers it 400, and an id the server does not serve gets 404
naming it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from stip.common.wire import BUNDLE_HEADER

if TYPE_CHECKING:
    from stip.server.auth import Principal
    from stip.server.service import StipService

__all__ = ["BUNDLE_HEADER", "ContextError", "Contexts"]


class ContextError(Exception):
    """A request that names no context, or one this server does not serve; `status` is the HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _short(value: str, limit: int = 80) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


class Contexts:
    """The contexts of one server, by bundle id, in the order they were given (the first is the default of a
    single-bundle server)."""

    def __init__(self, engines: list = ()):
        self.engines = list(engines)  # engines known before their services exist (for the metrics' first read)
        self.services: list[StipService] = []

    def add(self, service: "StipService") -> None:
        if any(s.bundle_id == service.bundle_id for s in self.services):
            raise ValueError(f"bundle {service.bundle_id} is given twice: each context needs its own bundle")
        self.services.append(service)

    @property
    def first(self) -> "StipService":
        return self.services[0]

    @property
    def ids(self) -> list[str]:
        return [s.bundle_id for s in self.services]

    def __len__(self) -> int:
        return len(self.services)

    def pick(self, headers: Mapping[str, str]) -> "StipService":
        """The context a request names in its `X-STIP-Bundle` header (call after authenticating it)."""
        wanted = headers.get(BUNDLE_HEADER)
        if wanted is None:
            if len(self.services) == 1:
                return self.first
            raise ContextError(400, f"this server serves {len(self.services)} contexts (bundles "
                                    f"{', '.join(self.ids)}): name yours in the {BUNDLE_HEADER} header (stip.Client "
                                    f"sends its client bundle's id)")
        wanted = wanted.strip()
        for s in self.services:
            if s.bundle_id == wanted:
                return s
        raise ContextError(404, f"this server does not serve bundle {_short(wanted)}; it serves "
                                f"{', '.join(self.ids)}: use the client bundle of one of those `stip protect` or "
                                f"`stip rekey` runs")

    # ------------------------------------------------------------ what the server reports

    def engine_stats(self) -> dict:
        """The engines' figures summed over contexts (`StipService.engine_stats`); names and modes joined."""
        parts = [s.engine_stats() for s in self.services] or [
            {"engine": getattr(e, "name", type(e).__name__), "mode": "round-trip", **(e.stats() if hasattr(e, "stats")
                                                                                     else {})}
            for e in self.engines]
        joined = lambda key: "+".join(dict.fromkeys(str(p.get(key, "")) for p in parts))  # noqa: E731
        out = {"engine": joined("engine"), "mode": joined("mode")}
        for key in ("batch_size", "queue", "running"):
            out[key] = sum(int(p.get(key, 0)) for p in parts)
        return out

    def health(self) -> dict:
        """/health: a single-bundle server's answer is unchanged; several contexts add how many there are (counts
        only: the bundle ids are at /v1/contexts, behind a key)."""
        if len(self.services) == 1:
            return self.first.health()
        st = self.engine_stats()
        return {"status": "ok", "engine": st["engine"], "mode": st["mode"], "batch_size": st["batch_size"],
                "queue": st["queue"], "contexts": len(self.services)}

    def listing(self, who: "Principal") -> dict:
        """/v1/contexts: the bundles served (ids, mode, task, model type, signer, rekey budget), for an authenticated
        caller; the tokens each served too where `who` may read /metrics (`StipService.key_usage`)."""
        return {"status": "ok", "header": BUNDLE_HEADER, "contexts": [
            {"bundle_id": s.bundle_id, "mode": s.mode, "task": s.task, "model_type": s.engine.model_type,
             "signer": (getattr(s.engine, "manifest", None) or {}).get("signer", {}).get("fingerprint"),
             "max_seq_len": s.max_seq_len, **s.key_usage(who)} for s in self.services]}

    def sessions(self) -> int:
        return sum(len(s.sessions) for s in self.services)

    def kv_caches(self) -> int:
        return sum(s.sessions.kv_caches for s in self.services)

    def kv_tokens(self) -> int:
        return sum(s.sessions.kv_tokens for s in self.services)

    @property
    def max_message_bytes(self) -> int:
        return max(s.max_message_bytes for s in self.services)

    async def start(self) -> None:
        for s in self.services:
            await s.start()

    async def stop(self) -> None:
        for s in self.services:
            await s.stop()
