"""One served context's state and its session steps: the engine, its worker threads, sessions, admission, auth and
metrics (`StipService`), and what a step does once its frame is checked (`stip.server.step_request`).

The event loop only authenticates, frames and validates; every tensor operation (decoding the payload, the forward,
top-k, encoding the reply) runs on a single worker thread that owns the engine, so sessions interleave step by step
and torch keeps all cores for the one forward in flight (`--no-batching`). With batching (the default) each step in
flight gets its own worker thread instead, and the engine (`stip.server.scheduler`) merges them into one forward per
tick. The routes (`stip.server.*_route`) call into it; `stip.server.app` wires them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from stip.common import wire
from stip.common.layout import HEAD_SERVER
from stip.common.tasks import TEXT_GENERATION
from stip.server.auth import REVOCATION_POLL, Authenticator, AuthError, Principal
from stip.server.budget import Admission, AdmissionError, Quota
from stip.server.engine import Engine, TokenEngine
from stip.server.generations import Generations
from stip.server.key_usage import KeyUsage
from stip.server.metrics import Metrics
from stip.server.sessions import Session, SessionManager
from stip.server.step_request import StepError, parse_step, reply_parts, short_repr

log = logging.getLogger("stip.server")

HEADER_SLACK = 64 * 1024


@dataclass
class Settings:
    token: str | None = None
    api_keys: str | None = None  # path of a stip-apikeys file (stip.server.auth)
    max_sessions: int = 64
    max_seq_len: int = 4096
    session_ttl: float = 300.0
    max_message_bytes: int | None = None  # None: room for max_seq_len float32 embeddings
    max_reply_bytes: int = 512 * 1024 * 1024
    kv_budget_tokens: int | None = None  # None: max_sessions x max_seq_len (run_server derives it from memory)
    max_all_logits: int = 1 << 24  # T x V logits one positions="all" prefill may compute (64 MB of float32)
    client_quota: Quota = Quota()  # quotas of the single token, and of keys that set none
    expose_timing: bool = False  # send clients each step's server compute time ("server_ms"): a timing side channel
    rekey_after: int | None = None  # tokens a context's key may serve before it takes no new sessions (key_usage)


KEY_SHARE = 4  # by default one API key may hold at most 1/KEY_SHARE of the session slots and of the KV budget


def key_default_quota(client: Quota, max_sessions: int, budget_tokens: int) -> Quota:
    """The quota of an API key whose entry sets none: the operator's --client-max-* values, else a fair share, so
    that no single key can take every session slot or the whole KV budget for a TTL."""
    return Quota(client.max_sessions or max(1, max_sessions // KEY_SHARE),
                 client.max_tokens or max(1, budget_tokens // KEY_SHARE), client.max_tokens_per_minute)


class StipService:
    """Everything one server process holds: engine, worker thread, sessions, metrics."""

    def __init__(self, engine: Engine, settings: Settings, bundle_id: str = "", *, auth: Authenticator | None = None,
                 admission: Admission | None = None, metrics: Metrics | None = None, usage: KeyUsage | None = None):
        """`auth`, `admission`, `metrics` and `usage` are shared when one server serves several contexts
        (`stip.server.contexts`): one key file, one session limit and KV budget, one /metrics, one rekey budget and
        usage file for all of them."""
        self.engine, self.settings, self.bundle_id = engine, settings, bundle_id
        limit = settings.max_seq_len
        if engine.max_positions:
            limit = min(limit, engine.max_positions)
        self.max_seq_len = limit
        self.mode = "server-decode" if isinstance(engine, TokenEngine) else "round-trip"
        # where the LM head is (`stip protect --head`): "client" -> the engine's "logits" are the final hidden state
        self.head = (getattr(engine, "manifest", None) or {}).get("head", HEAD_SERVER)
        self.task = getattr(engine, "task", TEXT_GENERATION)  # one-shot engines (stip.server.encoder) say theirs
        self.max_message_bytes = settings.max_message_bytes or (limit * (getattr(engine, "hidden_size", 0) or 1) * 4
                                                                + HEADER_SLACK)
        # One thread per step in flight where the engine batches concurrent steps (stip.server.scheduler), else one.
        self.worker = ThreadPoolExecutor(max_workers=max(1, min(getattr(engine, "concurrent_steps", 1),
                                                                settings.max_sessions + 1)),
                                         thread_name_prefix="stip-engine")
        self.admission = admission or Admission(settings.kv_budget_tokens or settings.max_sessions * limit,
                                                settings.max_sessions, engine.kv_bytes_per_token)
        self.auth = auth or Authenticator(settings.token, settings.api_keys, settings.client_quota,
                                          key_default_quota(settings.client_quota, settings.max_sessions,
                                                            self.admission.total))
        self._auth_generation = self.auth.generation
        self.sessions = SessionManager(getattr(engine, "new_state", lambda: None), self._free_state,
                                       settings.session_ttl)
        self.waiting = 0  # steps handed to the worker pool that have not started (the serial engine's queue)
        self._waiting_lock = threading.Lock()
        self.metrics = metrics or Metrics(lambda: len(self.sessions), lambda: self.sessions.kv_caches,
                                          lambda: self.sessions.kv_tokens, lambda: self.admission.used,
                                          lambda: self.admission.total, self.engine_stats)
        inner = engine  # the scheduler, possibly under a server-decode engine, feeds the rows-per-tick histogram
        while inner is not None and not hasattr(inner, "add_tick_observer"):
            inner = getattr(inner, "engine", None)
        if inner is not None:
            inner.add_tick_observer(self.metrics.tick_rows.observe)
        if hasattr(engine, "add_end_observer"):  # server-decode on our engine: each generation's real KV length
            engine.add_end_observer(self.metrics.generation_kv_tokens.observe)
        self.generations = Generations()  # running /v1/generate streams, cut when their key is revoked
        self.usage = usage or KeyUsage(settings.rekey_after)  # tokens each key served (stip serve --rekey-after)
        self.metrics.context_tokens.labels(bundle_id).inc(self.usage.register(bundle_id))
        self.metrics.rekey_after.set(self.usage.rekey_after or 0)
        self._expiry_task: asyncio.Task | None = None

    # ------------------------------------------------------------ lifecycle

    def _free_state(self, s: Session) -> None:
        self.admission.close_session(s.owner, s.reserved)
        s.reserved = 0
        self.worker.submit(self.engine.free, s.state)

    async def start(self) -> None:
        self._expiry_task = asyncio.create_task(self._expiry_loop())

    async def stop(self) -> None:
        if self._expiry_task:
            self._expiry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry_task
        self.sessions.clear()
        self.usage.flush(force=True)
        self.worker.shutdown(wait=False, cancel_futures=True)
        self.engine.close()

    async def _expiry_loop(self) -> None:
        period = max(0.05, min(REVOCATION_POLL, self.settings.session_ttl / 4))  # see auth.REVOCATION_BOUND
        while True:
            await asyncio.sleep(period)
            self.drop_revoked()
            self.usage.flush()
            n = self.sessions.expire()
            if n:
                self.metrics.sessions_closed.labels("expired").inc(n)
                log.info("expired %d idle session(s); %d open", n, len(self.sessions))

    # ------------------------------------------------------------ info

    def engine_stats(self) -> dict:
        """The engine's own figures (`Engine.stats`), its queue counting the steps still waiting for a worker."""
        stats = dict(self.engine.stats()) if hasattr(self.engine, "stats") else {}
        stats.setdefault("engine", type(self.engine).__name__)
        stats.setdefault("mode", "round-trip")
        stats["queue"] = int(stats.get("queue", 0)) + self.waiting
        return stats

    def health(self) -> dict:
        """Open to anyone: that the server is up, and the engine's load (name, mode, rows in the last tick, steps
        waiting). Counts of the whole server only: nothing per client, nothing secret."""
        st = self.engine_stats()
        return {"status": "ok", "engine": st["engine"], "mode": st["mode"],
                "batch_size": int(st.get("batch_size", 0)), "queue": st["queue"]}

    def info(self, who: Principal) -> dict:
        """The model, the limits, and the caller's own usage (never other clients'); needs auth."""
        e, q, u = self.engine, who.quota, self.admission.usage(who.name)
        return {"status": "ok", "bundle_id": self.bundle_id, "model_type": e.model_type, "mode": self.mode,
                "task": self.task,
                "hidden_size": getattr(e, "hidden_size", None), "vocab_size": e.vocab_size,
                "signer": (getattr(e, "manifest", None) or {}).get("signer", {}).get("fingerprint"),
                "protocol": wire.PROTOCOL_VERSION, "head": self.head, "max_seq_len": self.max_seq_len,
                "max_message_bytes": self.max_message_bytes, "max_all_logits": self.settings.max_all_logits,
                "session_ttl": self.settings.session_ttl, "kv_budget_tokens": self.admission.total,
                "client": who.name, "sessions": u.sessions, "kv_tokens": u.tokens,
                "max_sessions": min(q.max_sessions or self.settings.max_sessions, self.settings.max_sessions),
                "max_tokens": min(q.max_tokens or self.admission.total, self.admission.total),
                "max_tokens_per_minute": q.max_tokens_per_minute, **self.key_usage(who)}

    def key_usage(self, who: Principal) -> dict:
        """The rekey budget for anyone with a key; the tokens this context served (every client's) only for a
        caller who may read /metrics."""
        out = {"rekey_after": self.usage.rekey_after}
        if who.metrics:
            out["tokens_served"] = self.usage.served.get(self.bundle_id, 0)
        return out

    def hello(self, s: Session) -> dict:
        return {"ok": True, "kind": "hello", "session": s.id, "position": s.position, "bundle_id": self.bundle_id,
                "hidden_size": self.engine.hidden_size, "vocab_size": self.engine.vocab_size,
                "max_seq_len": self.max_seq_len, "max_message_bytes": self.max_message_bytes,
                "protocol": wire.PROTOCOL_VERSION, "head": self.head}

    def drop_revoked(self) -> None:
        """Re-read the key file if it changed; free the sessions and cut the running generations of clients that
        lost their key (whichever request or timer saw the change first)."""
        self.auth.refresh()
        if self.auth.generation != self._auth_generation:
            self._auth_generation = self.auth.generation
            for owner in self.sessions.owners() | self.generations.owners():
                if not self.auth.is_active(owner):
                    gone = self.sessions.owned_by(owner)
                    for s in gone:
                        self.sessions.remove(s, "revoked")
                    self.metrics.sessions_closed.labels("revoked").inc(len(gone))
                    cut = self.generations.cut(owner)
                    log.info("closed %d session(s) and %d generation(s) of a revoked client", len(gone), cut)

    # ------------------------------------------------------------ steps

    def parse_request(self, s: Session, data) -> tuple[str, dict, memoryview]:
        """Validate a frame against the protocol and the session (`stip.server.step_request`)."""
        return parse_step(self, s, data)

    def run_step(self, s: Session, op: str, req: dict, payload: memoryview) -> tuple[dict, list[bytes]]:
        """On the worker thread: payload -> tensor -> forward -> downlink bytes."""
        with self._waiting_lock:
            self.waiting -= 1
        t0 = time.perf_counter()
        targets = None
        if req.get("targets"):  # int32 [T] after the embeddings: the permuted index whose logit each row also sends
            split = len(payload) - 4 * req["tokens"]
            payload, targets = payload[:split], wire.tensor_from_bytes(payload[split:], torch.int32, [req["tokens"]])
            if bool((targets < -1).any()) or bool((targets >= self.engine.vocab_size).any()):
                raise StepError(422, f"targets must be indices in [0, {self.engine.vocab_size}) or -1")
        x = wire.tensor_from_bytes(payload, req["dtype"], req["shape"])
        if not bool(torch.isfinite(x).all()):
            raise StepError(422, "embeddings contain NaN or Inf values")
        if s.closed:
            raise self.gone(s)
        before = self.engine.length(s.state)
        try:
            if op == "prefill":
                logits = self.engine.prefill(s.state, x, all_positions=req["all"])
            else:
                logits = self.engine.decode(s.state, x.reshape(1, -1))
        except Exception as e:
            if s.closed:  # freed under the queued step (its key revoked, or closed): not the model's fault
                raise self.gone(s) from None
            # The KV cache may hold part of this step: the session cannot continue exactly.
            log.exception("engine failure in a %s step (session dropped)", op)
            raise StepError(500, f"internal error in the model ({type(e).__name__}); the session was dropped",
                            fatal=True) from None
        t = self.engine.length(s.state) - before
        kind, shape, dtype, parts = reply_parts(logits, req, targets)
        ms = (time.perf_counter() - t0) * 1000
        self.metrics.steps.labels(op).observe(ms / 1000)
        self.metrics.tokens.labels(op).inc(t)
        header = {"ok": True, "kind": kind, "shape": shape, "dtype": dtype, "position": self.engine.length(s.state)}
        if self.settings.expose_timing:  # off by default: per-step times let a key holder probe shared caches
            header["server_ms"] = round(ms, 3)
        return header, parts

    @staticmethod
    def gone(s: Session) -> StepError:
        """The answer to a step on a session that was freed, also one queued when that happened: 403 if its key was
        revoked (as the key's next request gets), else 404."""
        if s.closed_by == "revoked":
            return StepError(403, "this API key was revoked: its sessions were closed", fatal=True)
        return StepError(404, "session expired or was closed; open a new session", fatal=True)

    def authorize(self, authorization: str | None) -> Principal:
        """The caller of a step: a key revoked since the socket opened ends the session (403, fatal); an unreadable
        key file (503) only refuses the step."""
        try:
            return self.auth.authenticate(authorization)
        except AuthError as e:
            raise StepError(e.status, str(e), fatal=e.status in (401, 403)) from None

    def count_served(self, tokens: int) -> None:
        """Tokens this context's key has now served (`stip.server.key_usage`): /metrics and the rekey budget."""
        if tokens > 0:
            self.usage.add(self.bundle_id, tokens)
            self.metrics.context_tokens.labels(self.bundle_id).inc(tokens)

    def check_key_budget(self) -> None:
        """Before a new session or request: refuse it (AdmissionError "rekey_budget", counted in /metrics) when this
        context's key has served its --rekey-after tokens. Steps of sessions already open are never refused here."""
        try:
            self.usage.check_open(self.bundle_id)
        except AdmissionError as e:
            self.metrics.refused.labels(e.reason).inc()
            raise

    def admit(self, s: Session, who: Principal, tokens: int) -> None:
        """Reserve the step's KV tokens before it runs (on the loop, so concurrent steps cannot overshoot)."""
        try:
            self.admission.reserve(s.owner, who.quota, tokens)
        except AdmissionError as e:
            self.metrics.refused.labels(e.reason).inc()
            raise StepError(e.status, str(e)) from None
        s.reserved += tokens

    def admit_request(self, who: Principal, tokens: int) -> None:
        """A request that lives for one HTTP call (/v1/generate, /v1/encode): it takes one of the caller's session
        slots and reserves all its tokens up front, or raises AdmissionError (counted in /metrics) holding nothing.
        The caller returns both with `admission.close_session(who.name, tokens)`. A context past its rekey budget
        refuses it first."""
        self.check_key_budget()
        try:
            self.admission.open_session(who.name, who.quota)
        except AdmissionError as e:
            self.metrics.refused.labels(e.reason).inc()
            raise
        try:
            self.admission.reserve(who.name, who.quota, tokens)
        except AdmissionError as e:
            self.admission.close_session(who.name, 0)
            self.metrics.refused.labels(e.reason).inc()
            raise

    async def handle(self, s: Session, data, authorization: str | None = None) -> tuple[bytes, int | None]:
        """One request frame -> (reply frame, WebSocket close code if the socket must close afterwards)."""
        try:
            who = self.authorize(authorization)
            if s.closed:
                raise self.gone(s)
            try:
                op, req, payload = self.parse_request(s, data)
            except StepError:
                raise
            except Exception as e:  # a header of the wrong shape the checks above did not foresee: still its fault
                raise StepError(400, f"malformed request header ({type(e).__name__}: {short_repr(str(e))})") from None
            if op == "close":
                self.sessions.remove(s)
                self.metrics.sessions_closed.labels("closed").inc()
                return wire.encode_frame({"ok": True, "kind": "closed", "position": 0}), 1000
            self.admit(s, who, req["tokens"])
            self.count_served(req["tokens"])  # rows the server takes in: what the key leaks (key_usage)
            s.busy = True
            try:
                with self._waiting_lock:
                    self.waiting += 1
                header, parts = await asyncio.get_running_loop().run_in_executor(
                    self.worker, self.run_step, s, op, req, payload)
                s.position = header["position"]
            finally:
                s.busy = False
                s.touch()
                if not s.closed:  # keep what the cache holds now, return the rest of the reservation
                    self.admission.release(s.owner, s.reserved - s.position)
                    s.reserved = s.position
            return wire.encode_frame(header, *parts), None
        except Exception as e:
            if not isinstance(e, StepError):
                log.exception("unexpected error while serving a request (session dropped)")
                e = StepError(500, f"internal server error ({type(e).__name__}); the session was dropped",
                              fatal=True)
            if e.fatal and not s.closed:
                self.sessions.remove(s, "revoked" if e.status == 403 else "")
                self.metrics.sessions_closed.labels("revoked" if e.status == 403 else "error").inc()
            log.info("%s error %d: %s", "fatal" if e.fatal else "request", e.status, e)
            return self.error_frame(e.status, str(e), e.fatal), (4000 + e.status if e.fatal else None)

    def error_frame(self, status: int, message: str, fatal: bool = True) -> bytes:
        self.metrics.errors.labels(str(status)).inc()
        return wire.encode_frame(wire.error_header(status, message, fatal))
