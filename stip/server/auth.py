"""Per-client API keys: a JSON file of hashed keys, each with its quotas, reloaded when it changes.

    {"format": "stip-apikeys", "version": 1,
     "keys": [{"name": "alice", "sha256": "<hex of sha256(key)>", "max_sessions": 4, "max_tokens": 16384,
               "max_tokens_per_minute": null, "metrics": false, "revoked": false}]}

Keys are 256-bit random strings (`secrets.token_urlsafe(32)`), so a plain sha256 is enough: there is no password to
brute-force, and hashing stays cheap enough to check on every step. The file never holds a key, only its hash;
`stip apikey create` prints the key once. The server re-reads the file when it changes (its stamp is checked at most
every RELOAD_INTERVAL, on requests and on the server's own timer every REVOCATION_POLL), so a revocation takes effect
without a restart: within REVOCATION_BOUND seconds the key is refused, its sessions are closed and its running
generations are cut (`stip.server.service`). If the file becomes unreadable the server refuses every key from it (503)
until it is fixed, rather than keep honouring keys someone may have just revoked.

The names "token" (the single --token) and "anonymous" (loopback without a token) are the server's own clients: a key
of that name would share their sessions and quotas, so `stip apikey create` refuses them and so does every load.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stip.common.files import write_json_atomic
from stip.errors import StipError
from stip.server.budget import Quota

log = logging.getLogger("stip.server.auth")

FILE_FORMAT = "stip-apikeys"
FILE_VERSION = 1
RELOAD_INTERVAL = 0.5  # seconds between two looks at the key file's stamp
REVOCATION_POLL = 0.25  # the server's timer: look again (at most every RELOAD_INTERVAL) and act on a change
REVOCATION_BOUND = 1.0  # RELOAD_INTERVAL + 2 x REVOCATION_POLL: a change is seen and acted on within this
TOKEN_CLIENT = "token"  # the client name of the single --token / STIP_TOKEN
ANONYMOUS = "anonymous"  # loopback without any token
RESERVED_NAMES = (TOKEN_CLIENT, ANONYMOUS)


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    max_sessions: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_tokens_per_minute: int | None = Field(default=None, ge=1)
    metrics: bool = False  # may read /metrics (server-wide counts of every client)
    revoked: bool = False

    @field_validator("name")
    @classmethod
    def _not_built_in(cls, name: str) -> str:
        if name.lower() in RESERVED_NAMES:
            raise ValueError(f"the name {name!r} is reserved: {TOKEN_CLIENT!r} is the client of the single --token and "
                             f"{ANONYMOUS!r} the one of a server without a token; pick another name")
        return name

    @property
    def quota(self) -> Quota:
        return Quota(self.max_sessions, self.max_tokens, self.max_tokens_per_minute)


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = FILE_FORMAT
    version: int = FILE_VERSION
    keys: list[KeyEntry] = []


@dataclass(frozen=True)
class Principal:
    """An authenticated client: its name (owner of its sessions), quotas and rights."""

    name: str
    quota: Quota
    metrics: bool = True


class AuthError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_key_file(path: str | Path) -> KeyFile:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise StipError(f"API key file {path} does not exist (create it with `stip apikey create {path} NAME`)") \
            from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StipError(f"API key file {path} is not readable JSON: {e}") from None
    try:
        kf = KeyFile.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise StipError(f"API key file {path} is malformed at {where or 'top level'}: "
                        f"{first['msg'].removeprefix('Value error, ')}") from None
    if kf.format != FILE_FORMAT or kf.version != FILE_VERSION:
        raise StipError(f"{path} is not a {FILE_FORMAT} v{FILE_VERSION} file (format {kf.format!r}, "
                        f"version {kf.version})")
    names = [k.name for k in kf.keys]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise StipError(f"API key file {path} names {', '.join(sorted(dup))} more than once")
    return kf


# ---------------------------------------------------------------- managing the file (the `stip apikey` commands)


def create_key(path: str | Path, name: str, max_sessions: int | None = None, max_tokens: int | None = None,
               max_tokens_per_minute: int | None = None, metrics: bool = False) -> str:
    """Add a client to the file (created if missing, mode 0600); the new key, which is stored only as its hash."""
    path = Path(path)
    kf = load_key_file(path) if path.exists() else KeyFile()
    if any(k.name == name for k in kf.keys):
        raise StipError(f"{path} already has a client named {name!r} (revoked names stay taken; pick another)")
    key = "stip_" + secrets.token_urlsafe(32)
    try:
        entry = KeyEntry(name=name, sha256=hash_key(key), max_sessions=max_sessions, max_tokens=max_tokens,
                         max_tokens_per_minute=max_tokens_per_minute, metrics=metrics)
    except ValidationError as e:
        first = e.errors()[0]
        raise StipError(f"invalid {first['loc'][0]}: {first['msg'].removeprefix('Value error, ')}") from None
    kf.keys.append(entry)
    write_json_atomic(path, kf.model_dump(), mode=0o600)
    return key


def revoke_key(path: str | Path, name: str) -> None:
    path = Path(path)
    kf = load_key_file(path)
    for k in kf.keys:
        if k.name == name:
            k.revoked = True
            write_json_atomic(path, kf.model_dump(), mode=0o600)
            return
    raise StipError(f"{path} has no client named {name!r}")


def list_keys(path: str | Path) -> list[dict]:
    """Every client with its quotas and state; never the hashes."""
    return [k.model_dump(exclude={"sha256"}) for k in load_key_file(path).keys]


# ---------------------------------------------------------------- checking keys (the server)


class Authenticator:
    """Maps an Authorization header to a Principal: the single token, keys from a file, or nobody (loopback)."""

    def __init__(self, token: str | None = None, key_file: str | Path | None = None,
                 default_quota: Quota = Quota(), key_default_quota: Quota | None = None):
        """`default_quota` binds the single token (one principal, often shared by many users: by default only the
        server's own limits); `key_default_quota` fills what a key file entry leaves unset (default: the same)."""
        self.token, self.default_quota = token, default_quota
        self.key_default_quota = key_default_quota or default_quota
        self.path = Path(key_file) if key_file else None
        self._entries: list[KeyEntry] = []
        self._broken: str | None = None
        self._stamp: tuple | None = None
        self._checked = 0.0
        self.generation = 0  # bumped on every reload, so any caller can tell that the key set changed
        if self.path:
            self._entries = list(load_key_file(self.path).keys)  # a bad file at startup is a CLI error
            self._stamp = self._file_stamp()
            self._checked = time.monotonic()

    @property
    def required(self) -> bool:
        return bool(self.token or self.path)

    def _file_stamp(self) -> tuple | None:
        try:
            st = os.stat(self.path)
            return st.st_mtime_ns, st.st_size, st.st_ino
        except OSError:
            return None

    def refresh(self, force: bool = False) -> bool:
        """Re-read the key file if it changed (at most once per RELOAD_INTERVAL); True if it was re-read."""
        if not self.path:
            return False
        now = time.monotonic()
        if not force and now - self._checked < RELOAD_INTERVAL:
            return False
        self._checked = now
        stamp = self._file_stamp()
        if stamp == self._stamp and not force:
            return False
        self._stamp = stamp
        self.generation += 1
        try:
            self._entries = list(load_key_file(self.path).keys)
            self._broken = None
            log.info("API key file reloaded: %d client(s), %d revoked", len(self._entries),
                     sum(k.revoked for k in self._entries))
        except StipError as e:
            self._broken = str(e)  # the last good entries stay, only to keep their sessions (see is_active)
            log.error("API key file unusable, refusing its keys until it is fixed: %s", e)
        return True

    def is_active(self, name: str) -> bool:
        """Whether sessions owned by client `name` may live on (False once its key is revoked or removed)."""
        if name == ANONYMOUS:
            return not self.required
        if name == TOKEN_CLIENT and self.token:
            return True
        # While the file is broken its keys are refused, but their sessions are kept for when it is fixed.
        return any(k.name == name and not k.revoked for k in self._entries)

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller, or AuthError: 401 no credentials, 403 wrong or revoked key, 503 key file unreadable."""
        if not self.required:
            return Principal(ANONYMOUS, self.default_quota)
        scheme, _, value = (authorization or "").partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value:
            raise AuthError(401, "missing bearer token (send Authorization: Bearer <key>)")
        self.refresh()
        presented = value.encode()
        if self.token and hmac.compare_digest(presented, self.token.encode()):
            return Principal(TOKEN_CLIENT, self.default_quota)
        if self.path and self._broken:
            raise AuthError(503, "the server's API key file is unreadable; ask its operator to fix it")
        if self.path:
            digest = hash_key(value).encode()
            found = None
            for k in self._entries:  # every entry, constant-time each: no early exit on a match
                if hmac.compare_digest(digest, k.sha256.encode()) and found is None:
                    found = k
            if found is not None:
                if found.revoked:
                    raise AuthError(403, "this API key was revoked")
                q = found.quota
                d = self.key_default_quota
                return Principal(found.name, Quota(q.max_sessions or d.max_sessions, q.max_tokens or d.max_tokens,
                                                   q.max_tokens_per_minute or d.max_tokens_per_minute),
                                 metrics=found.metrics)
        raise AuthError(403, "invalid bearer token or API key")
