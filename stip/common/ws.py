"""WebSocket client options shared by the parties that open sockets (the client to a server, the enclave to its
worker)."""

from __future__ import annotations


def legacy_kw(connect) -> dict:
    """websockets >= 16 warns unless a directly-returned connection is asked for explicitly."""
    import inspect

    return {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}
