"""How many tokens each context's key has served, against the operator's rekey budget (`stip serve --rekey-after`).

Every token a client sends through a context leaks a little of its key: the server's view of a token is a fixed
function of the key (plus noise in the noise modes), so over enough traffic a substitution decipherer recovers tokens
(bench/decipher.py measures how fast). A key should therefore serve a bounded number of tokens. Counted here, per
bundle id: every embedding row of a session step the server runs (prefill rows and decode rows), every prompt token
and generated token of a server-decode generation, and every row (B x T) of a one-shot /v1/encode request.

At `WARN_FRACTION` of the budget the server logs a warning once per context; from the budget on, the context takes
no new sessions, generations or encode requests (`AdmissionError("rekey_budget")`, HTTP 403: only a new key ends
it, so clients must not retry), while the sessions already open run to their end and other contexts keep serving.

Counts live in memory for the process's lifetime; with `--usage-file` they are loaded at start-up and written back
atomically (a temporary file, then a rename) at most every `FLUSH_SECONDS` while they change, when a threshold is
crossed, and at shutdown. Runs on the event loop only.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

from stip.errors import StipError
from stip.server.budget import AdmissionError

log = logging.getLogger("stip.server")

WARN_FRACTION = 0.8
FLUSH_SECONDS = 1.0
USAGE_FORMAT = "stip-key-usage"
USAGE_VERSION = 1


def read_usage_file(path: str | Path) -> dict[str, int]:
    """bundle id -> tokens served, from a usage file; a file that does not exist yet is empty. A file that is not one
    is a StipError (the server refuses to start rather than lose or invent counts)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise StipError(f"cannot read the usage file {path}: {e.strerror or e}") from None
    try:
        data = json.loads(text)
        counts = data["contexts"]
        if data.get("format") != USAGE_FORMAT or not isinstance(counts, dict):
            raise ValueError
        if not all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in counts.items()):
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise StipError(f"{path} is not a STIP usage file (expected JSON {{\"format\": \"{USAGE_FORMAT}\", "
                        f"\"contexts\": {{BUNDLE_ID: TOKENS}}}}); pass another --usage-file or move it away") from None
    return dict(counts)


def write_usage_file(path: str | Path, counts: dict[str, int]) -> None:
    """Write the counts atomically: readers and a crash see the old file or the new one, never half of one."""
    path = Path(path)
    body = json.dumps({"format": USAGE_FORMAT, "version": USAGE_VERSION, "contexts": counts}, indent=1,
                      sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class KeyUsage:
    """Tokens served per context (bundle id) and the rekey budget every context of this server shares."""

    def __init__(self, rekey_after: int | None = None, usage_file: str | Path | None = None):
        if rekey_after is not None and rekey_after < 1:
            raise StipError(f"rekey_after must be at least 1 token, got {rekey_after}")
        self.rekey_after = rekey_after
        self.usage_file = Path(usage_file) if usage_file is not None else None
        self.served: dict[str, int] = read_usage_file(self.usage_file) if self.usage_file else {}
        self.where: dict[str, str] = {}  # bundle id -> the folder it is served from, named in the operator's log only
        self._warned: set[str] = set()
        self._spent: set[str] = set()
        self._dirty = False
        self._flushed_at = 0.0
        if self.usage_file is not None:
            try:  # a folder that cannot take the file stops the server now, not at the first flush
                write_usage_file(self.usage_file, self.served)
            except OSError as e:
                raise StipError(f"cannot write the usage file {self.usage_file}: {e.strerror or e}") from None

    def register(self, bundle_id: str) -> int:
        """A context this server serves: its count so far (saved counts included), logged if already past a
        threshold."""
        self.served.setdefault(bundle_id, 0)
        self._check_thresholds(bundle_id)
        return self.served[bundle_id]

    def add(self, bundle_id: str, tokens: int) -> None:
        if tokens <= 0:
            return
        self.served[bundle_id] = self.served.get(bundle_id, 0) + tokens
        self._dirty = True
        if self._check_thresholds(bundle_id):
            self.flush(force=True)

    def spent(self, bundle_id: str) -> bool:
        return self.rekey_after is not None and self.served.get(bundle_id, 0) >= self.rekey_after

    def check_open(self, bundle_id: str) -> None:
        """Raise AdmissionError("rekey_budget") when the context may take no new session or request."""
        if self.spent(bundle_id):
            raise AdmissionError("rekey_budget", spent_message(bundle_id, self.served[bundle_id], self.rekey_after))

    def _check_thresholds(self, bundle_id: str) -> bool:
        """Log the 80% warning and the refusal notice, each once per context; True when one was logged now."""
        if self.rekey_after is None:
            return False
        n, budget, crossed = self.served.get(bundle_id, 0), self.rekey_after, False
        where = f" ({self.where[bundle_id]})" if bundle_id in self.where else ""
        if n >= WARN_FRACTION * budget and bundle_id not in self._warned:
            self._warned.add(bundle_id)
            crossed = True
            log.warning("context %s%s has served %d of its %d tokens before rekey (%.0f%%, --rekey-after): draw it "
                        "a new key with `stip rekey MODEL --from PROTECTED_DIR --out NEW_DIR` and serve the new "
                        "bundle beside it; from %d tokens on it takes no new sessions (docs/contexts.md)", bundle_id,
                        where, n, budget, 100.0 * n / budget, budget)
        if n >= budget and bundle_id not in self._spent:
            self._spent.add(bundle_id)
            crossed = True
            log.warning("context %s%s has served %d tokens, past its rekey budget of %d: new sessions and requests "
                        "on it are refused (403) until it is replaced by a bundle from `stip rekey`; open sessions "
                        "finish, other contexts keep serving", bundle_id, where, n, budget)
        return crossed

    def flush(self, force: bool = False) -> None:
        """Write the counts to the usage file if they changed (at most every FLUSH_SECONDS unless `force`)."""
        if self.usage_file is None or not self._dirty:
            return
        now = time.monotonic()
        if not force and now - self._flushed_at < FLUSH_SECONDS:
            return
        try:
            write_usage_file(self.usage_file, self.served)
        except OSError as e:  # keep serving and counting in memory; try again at the next flush
            log.error("cannot write the usage file %s: %s", self.usage_file, e)
            return
        self._dirty, self._flushed_at = False, now


def spent_message(bundle_id: str, served: int, rekey_after: int) -> str:
    """The refusal a client gets on a context past its budget: the context, the count, the budget and the fix."""
    return (f"context {bundle_id} has served {served} tokens, past this server's rekey budget of {rekey_after} "
            f"tokens per key (stip serve --rekey-after): it takes no new sessions or requests. The fix is a new key: "
            f"the developer runs `stip rekey MODEL --from PROTECTED_DIR --out NEW_DIR` for bundle {bundle_id}, the "
            f"server serves NEW_DIR/server, and clients switch to NEW_DIR/client (docs/contexts.md)")
