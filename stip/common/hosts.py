"""Which hosts count as this machine: the server (binding without a token), the client (sending a token over plain
http/ws) and the proxy (binding without a key) must all draw that line in the same place."""

from __future__ import annotations

import ipaddress


def is_loopback_host(host: str | None) -> bool:
    """`localhost` or a loopback IP literal; names are not resolved (a name that resolves to loopback is not trusted)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
