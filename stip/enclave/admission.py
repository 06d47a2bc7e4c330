"""Who may use the enclave, and how much: per-client limits on pending attestations and open sessions (the fair
share of model steps is stip.enclave.batch's).

A client is the principal it authenticated as (the token holder, or "anonymous" on a loopback enclave without a
token) together with its peer's network: the address for IPv4, the /64 for IPv6 (one host usually holds a whole
/64). With one shared token the network is what tells clients apart. Behind a reverse proxy on the same host the peer
is the proxy; uvicorn takes the client's address from X-Forwarded-For only when that proxy is on 127.0.0.1.

Refusals carry their HTTP status: a client over its own limit gets 429 (it must finish or drop what it holds);
the enclave as a whole being full is 503 (someone else holds it; retry later).
"""

from __future__ import annotations

import collections
import ipaddress
from dataclasses import dataclass

from stip.common.hosts import is_loopback_host
from stip.errors import StipError, TeeError

IPV6_CLIENT_PREFIX = 64


class Refused(TeeError):
    """A request the enclave turns away for load, not for being wrong; `status` is 429 or 503."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """`max_sessions`: open sessions in all; the `client_` limits bind each client (see the module docstring)."""

    max_sessions: int = 64
    client_max_sessions: int = 16
    max_pending: int = 1024
    client_max_pending: int = 16

    def __post_init__(self):
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_bind(host: str, token: str | None) -> None:
    """`stip serve`'s rule: without a client token, loopback only (a CLI error otherwise, before anything loads)."""
    if not token and not is_loopback_host(host):
        raise StipError(f"refusing to listen on {host} without a client token: anyone who can reach it could attest "
                        f"and generate. Pass --token (or set STIP_TOKEN), or bind to 127.0.0.1")


def client_id(principal: str, host: str | None) -> str:
    """`principal@network`: the unit every per-client limit counts in."""
    try:
        ip = ipaddress.ip_address((host or "").strip("[]"))
    except ValueError:
        return f"{principal}@{host or 'unknown'}"
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 6:
        return f"{principal}@{ipaddress.ip_network(f'{ip}/{IPV6_CLIENT_PREFIX}', strict=False)}"
    return f"{principal}@{ip}"


class Counter:
    """Things held, in all and per client, under two caps. Not thread-safe: callers hold their own lock (or run on
    the event loop)."""

    def __init__(self, what: str, total_cap: int, client_cap: int, advice: str):
        self.what, self.total_cap, self.client_cap, self.advice = what, total_cap, client_cap, advice
        self.total = 0
        self.per_client: collections.Counter[str] = collections.Counter()

    def take(self, client: str) -> None:
        if self.per_client[client] >= self.client_cap:
            raise Refused(429, f"this client holds {self.per_client[client]} {self.what}, its limit; {self.advice}")
        if self.total >= self.total_cap:
            raise Refused(503, f"the enclave is full: {self.total} {self.what} held in all; retry shortly")
        self.per_client[client] += 1
        self.total += 1

    def give_back(self, client: str) -> None:
        self.total -= 1
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]
