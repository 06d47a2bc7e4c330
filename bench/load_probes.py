"""The load test's view of the server: /health and /metrics polled through the run, and the KV state once every
user has left."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import urllib.request

KV_GAUGES = ("stip_sessions_active", "stip_kv_caches_live", "stip_kv_cache_tokens", "stip_kv_budget_used_tokens")


def http_get(url: str, token: str | None, timeout: float = 5.0) -> bytes:
    """A GET with the bearer token when given; the body."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
        return r.read()


def parse_metrics(text: str) -> dict[str, float]:
    """The unlabelled `stip_*` gauges and counters of a Prometheus text page (labelled ones keyed with labels)."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(stip_[A-Za-z0-9_]+(?:\{[^}]*\})?)\s+(\S+)$", line)
        if m:
            with contextlib.suppress(ValueError):
                out[m.group(1)] = float(m.group(2))
    return out


class Monitor(threading.Thread):
    """Polls /health every second and /metrics every two; keeps failures and each gauge's peak."""

    def __init__(self, url: str, token: str):
        super().__init__(daemon=True)
        self.url, self.token = url, token
        self.stop = threading.Event()
        self.checks = self.failures = 0
        self.failure_examples: list[str] = []
        self.peaks: dict[str, float] = {}
        self.last_health: dict = {}

    def run(self) -> None:
        tick = 0
        while not self.stop.wait(1.0):
            tick += 1
            self.checks += 1
            try:
                self.last_health = json.loads(http_get(self.url + "/health", None))
                if self.last_health.get("status") != "ok":
                    raise ValueError(f"status {self.last_health.get('status')!r}")
            except Exception as e:  # noqa: BLE001 - a failed probe is what is counted
                self.failures += 1
                if len(self.failure_examples) < 5:
                    self.failure_examples.append(f"{type(e).__name__}: {e}"[:200])
            if tick % 2 == 0:
                with contextlib.suppress(Exception):
                    for k, v in parse_metrics(http_get(self.url + "/metrics", self.token).decode()).items():
                        if "{" not in k and not k.endswith("_created"):
                            self.peaks[k] = max(v, self.peaks.get(k, v))


def kv_at_end(url: str, token: str, timeout: float) -> dict:
    """Wait until no session, KV cache or reserved KV token is left (or `timeout` s); what /metrics and /v1/info say."""
    t0 = time.monotonic()
    while True:
        m = parse_metrics(http_get(url + "/metrics", token).decode())
        kv = {k: m.get(k) for k in KV_GAUGES}
        if all(v == 0 for v in kv.values()) or time.monotonic() - t0 > timeout:
            break
        time.sleep(0.5)
    info = json.loads(http_get(url + "/v1/info", token))
    closed = {re.sub(r'.*reason="([^"]*)".*', r"\1", k): int(v) for k, v in m.items()
              if k.startswith("stip_sessions_closed_total{")}
    return {"metrics": kv, "info": {k: info.get(k) for k in ("sessions", "kv_tokens")}, "sessions_closed": closed,
            "zero": all(v == 0 for v in kv.values()) and info.get("sessions") == 0 and info.get("kv_tokens") == 0,
            "seconds_waited": round(time.monotonic() - t0, 1)}
