"""Real parties for tests: `stip serve` as a subprocess on a free loopback port, given only the server bundle.

The server gets a private folder holding hard links to the server bundle's files and nothing else, so it has no path
to the client bundle beside it: whatever it computes, it computes without client files.

    with serve(protected_dir / "server", token="t") as server:
        conn = Connection(server.url, token=server.token)

`serve` waits for /health, yields a `ServerProcess` (url, token, port, log), and kills the process at the end.
A bundle path may be the protected output folder (its `server/` is used) or the server bundle itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

STARTUP_TIMEOUT = 120.0


@dataclass
class ServerProcess:
    url: str
    port: int
    token: str | None
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=10) as r:
            return json.loads(r.read())

    def metrics(self) -> str:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        req = urllib.request.Request(self.url + "/metrics", headers=headers)
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read().decode()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_bundle(path: str | Path) -> Path:
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


def serve_command(bundle: str | Path, *args: str, host: str = "127.0.0.1", port: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "stip.cli", "serve", str(server_bundle(bundle)), "--host", host]
    if port is not None:
        cmd += ["--port", str(port)]
    return cmd + [str(a) for a in args]


def _env(token: str | None, env: dict | None) -> dict:
    e = dict(os.environ)
    e.pop("STIP_TOKEN", None)
    e.setdefault("HF_HUB_OFFLINE", "1")
    e.setdefault("TRANSFORMERS_OFFLINE", "1")
    e.setdefault("PYTHONUNBUFFERED", "1")
    if token:
        e["STIP_TOKEN"] = token
    e.update(env or {})
    return e


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def serve(bundle: str | Path, *args: str, token: str | None = None, env: dict | None = None,
          timeout: float = STARTUP_TIMEOUT, threads: int | None = None) -> Iterator[ServerProcess]:
    """Start `stip serve BUNDLE ARGS` on a free loopback port (token via STIP_TOKEN), yield once /health answers."""
    extra = list(args) + (["--threads", str(threads)] if threads else [])
    with isolated_server_bundle(bundle) as only_server:
        yield from _serve(only_server, extra, token, env, timeout)


def _serve(bundle: Path, extra: list[str], token: str | None, env: dict | None,
           timeout: float) -> Iterator[ServerProcess]:
    for attempt in range(3):
        port = free_port()
        log_file = tempfile.NamedTemporaryFile(prefix="stip-serve-", suffix=".log", delete=False)
        proc = subprocess.Popen(serve_command(bundle, *extra, port=port), stdout=log_file,
                                stderr=subprocess.STDOUT, env=_env(token, env), cwd=Path(__file__).parent.parent)
        log_file.close()
        server = ServerProcess(f"http://127.0.0.1:{port}", port, token, proc, Path(log_file.name))
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    break
                try:
                    server.health()
                    break
                except (urllib.error.URLError, OSError):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"stip serve did not answer /health within {timeout} s:\n{server.log()}")
                    time.sleep(0.1)
            if proc.poll() is not None:
                text = server.log()
                if "address already in use" in text.lower() and attempt < 2:
                    continue  # lost the race for the port: try another
                raise RuntimeError(f"stip serve exited with code {proc.returncode}:\n{text}")
            try:
                yield server
            finally:
                _stop(proc)
            return
        finally:
            _stop(proc)
            with contextlib.suppress(OSError):
                os.unlink(log_file.name)


def run_serve_expect_exit(bundle: str | Path, *args: str, token: str | None = None, host: str = "127.0.0.1",
                          timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run `stip serve` where it must refuse to start; returns the finished process (text output)."""
    return subprocess.run(serve_command(bundle, *args, host=host, port=free_port()), capture_output=True,
                          text=True, env=_env(token, None), timeout=timeout, cwd=Path(__file__).parent.parent)
