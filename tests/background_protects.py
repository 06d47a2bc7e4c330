"""SmolLM2 protected by the CLI for the session's fixtures, started in the background as soon as the session knows
which ones its tests need (tests/conftest.py).

Each is `stip protect smollm2 --out DIR --quiet OPTIONS`, exactly as a developer runs it, in its own process: about
20 s of mostly one core each. They run one at a time, in the order the tests first need them, at low CPU priority
(nice), so they take the core the first modules leave idle instead of stalling the module that first needs one; a
fixture waits for its own (and starts it, if the session did not).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

NICE = 10


class BackgroundProtects:
    """fixture name -> `stip protect smollm2` options; `start(names)` queues them, `get(name)` waits for one."""

    def __init__(self, options: dict[str, tuple[str, ...]]):
        self.options = options
        self._root: Path | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict[str, Future] = {}
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._closed = False

    def start(self, names: list[str]) -> None:
        for name in names:
            self._submit(name)

    def get(self, name: str) -> Path:
        return self._submit(name).result()

    def close(self) -> None:
        """Stop a protect still running (a session cut short) and remove the outputs."""
        with self._lock:
            self._closed = True
            for proc in self._procs:
                if proc.poll() is None:
                    proc.kill()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)

    def _submit(self, name: str) -> Future:
        with self._lock:
            if name not in self._futures:
                if self._pool is None:
                    self._root = Path(tempfile.mkdtemp(prefix="stip-tests-smollm2-"))
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="stip-test-protect")
                self._futures[name] = self._pool.submit(self._protect, name)
            return self._futures[name]

    def _protect(self, name: str) -> Path:
        out = self._root / name / "protected"
        nice = [shutil.which("nice"), "-n", str(NICE)] if shutil.which("nice") else []
        cmd = [*nice, sys.executable, "-m", "stip.cli", "protect", "smollm2", "--out", str(out), "--quiet",
               *self.options[name]]
        with self._lock:
            if self._closed:
                raise RuntimeError("the session is over")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self._procs.append(proc)
        stdout, stderr = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{(stdout + stderr)[-3000:]}")
        return out
