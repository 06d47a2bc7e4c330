"""Real parties for tests: `stip serve` as a subprocess on a free loopback port, given only the server bundle.

    with serve(protected_dir, token="t") as server:
        conn = Connection(server.url, token=server.token)

The server gets a private folder holding hard links to the server bundle's files and nothing else, so it has no path
to the client bundle beside it: whatever it computes, it computes without client files. Launching and stopping is
`stip.server.launch`, the same code `stip demo` and the benchmarks use.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

from stip.server.launch import ServerProcess, free_port, local_server, serve_command, server_env

__all__ = ["ServerProcess", "free_port", "serve", "run_serve_expect_exit"]


def server_bundle(path: str | Path) -> Path:
    """A protected output folder (its `server/`) or the server bundle itself."""
    path = Path(path)
    return path / "server" if (path / "server" / "stip-manifest.json").is_file() else path


@contextlib.contextmanager
def isolated_server_bundle(bundle: str | Path) -> Iterator[Path]:
    """A temporary folder with only the server bundle's files (hard links: instant, no copy)."""
    src = server_bundle(bundle)
    with tempfile.TemporaryDirectory(prefix="stip-server-only-") as tmp:
        dst = Path(tmp) / "server"
        dst.mkdir()
        for f in src.iterdir():
            if f.is_file():
                os.link(f, dst / f.name)
        yield dst


@contextlib.contextmanager
def serve(bundle: str | Path, *args: str, token: str | None = None, env: dict | None = None,
          timeout: float = 120.0, threads: int | None = None) -> Iterator[ServerProcess]:
    """Start `stip serve BUNDLE ARGS` (token via STIP_TOKEN) on an isolated copy; yield once /health answers."""
    extra = list(args) + (["--threads", str(threads)] if threads else [])
    with isolated_server_bundle(bundle) as only_server, \
            local_server(only_server, *extra, token=token, env=env, timeout=timeout) as server:
        yield server


def run_serve_expect_exit(bundle: str | Path, *args: str, token: str | None = None, host: str = "127.0.0.1",
                          timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run `stip serve` where it must refuse to start; returns the finished process (text output)."""
    return subprocess.run(serve_command(server_bundle(bundle), *args, host=host, port=free_port()),
                          capture_output=True, text=True, env=server_env(token, None), timeout=timeout)
