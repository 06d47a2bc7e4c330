"""`stip apikey`: the server operator's per-client API key file (create, revoke, list)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from stip.cli.app import app


apikey_app = typer.Typer(no_args_is_help=True, help="Manage a server's per-client API key file (hashes only).")
app.add_typer(apikey_app, name="apikey")


@apikey_app.command("create")
def apikey_create(
    file: Path = typer.Argument(..., help="the API key file (created if missing, owner-only)"),
    name: str = typer.Argument(..., help="the client's name (letters, digits, . _ - @; not token or anonymous)"),
    max_sessions: Optional[int] = typer.Option(None, help="sessions this client may hold at once"),
    max_tokens: Optional[int] = typer.Option(None, help="KV tokens this client's sessions may hold at once"),
    max_tokens_per_minute: Optional[int] = typer.Option(None, help="tokens this client may send per minute"),
    metrics: bool = typer.Option(False, help="may read /metrics (server-wide counts)"),
):
    """Add a client and print its new key, once: only its hash is stored."""
    from stip.server.auth import create_key

    key = create_key(file, name, max_sessions=max_sessions, max_tokens=max_tokens,
                     max_tokens_per_minute=max_tokens_per_minute, metrics=metrics)
    typer.echo(key)
    typer.echo(f"added client {name!r} to {file}; the key above is shown only now (the server keeps its hash)",
               err=True)


@apikey_app.command("revoke")
def apikey_revoke(file: Path = typer.Argument(...), name: str = typer.Argument(...)):
    """Revoke a client's key: within a second a running server refuses it, closes its sessions and cuts its streams."""
    from stip.server.auth import revoke_key

    revoke_key(file, name)
    typer.echo(f"revoked {name!r} in {file}")


@apikey_app.command("list")
def apikey_list(file: Path = typer.Argument(...)):
    """Clients, quotas and state (never keys or hashes)."""
    from stip.server.auth import list_keys

    typer.echo(json.dumps(list_keys(file), indent=2))
