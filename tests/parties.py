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
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, ContextManager, Hashable, Iterator

from stip.server.launch import ServerProcess, free_port, local_server, serve_command, server_env

__all__ = ["ServerProcess", "ServerPipeline", "free_port", "serve", "side_by_side", "stopped_in_background",
           "run_serve_expect_exit"]


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
    """Start `stip serve BUNDLE ARGS` (token via STIP_TOKEN) on an isolated copy; yield once /health answers. On exit
    the server is stopped in the background (its graceful shutdown and exit take about a second, which the next test
    need not wait for); `wait_for_stops` (the session's end, tests/conftest.py) waits for every one."""
    extra = list(args) + (["--threads", str(threads)] if threads else [])
    stack = contextlib.ExitStack()
    try:
        only_server = stack.enter_context(isolated_server_bundle(bundle))
        server = stack.enter_context(local_server(only_server, *extra, token=token, env=env, timeout=timeout))
    except BaseException:
        stack.close()
        raise
    with stopped_in_background(stack):
        yield server


@contextlib.contextmanager
def stopped_in_background(process: ContextManager):
    """Enter `process` (e.g. `local_process(...)` for a proxy) now; exit it in a background thread, so the test goes
    on while it shuts down. `wait_for_stops` waits for them all."""
    value = process.__enter__()
    try:
        yield value
    finally:
        def stop():
            t0 = time.monotonic()
            process.__exit__(None, None, None)
            _STOP_SECONDS.append(time.monotonic() - t0)
        stopping = threading.Thread(target=stop, name="stop a test's process")
        stopping.start()
        _STOPPING.append(stopping)


_STOPPING: list[threading.Thread] = []
_STOP_SECONDS: list[float] = []


def wait_for_stops() -> None:
    """Wait until every server `serve` started has stopped and its isolated bundle is gone."""
    while _STOPPING:
        _STOPPING.pop().join()
    if _STOP_SECONDS:
        print(f"\n{len(_STOP_SECONDS)} test processes (stip serve, proxies) stopped in the background, "
              f"{sum(_STOP_SECONDS):.1f} s in all")


def run_serve_expect_exit(bundle: str | Path, *args: str, token: str | None = None, host: str = "127.0.0.1",
                          timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run `stip serve` where it must refuse to start; returns the finished process (text output)."""
    return subprocess.run(serve_command(server_bundle(bundle), *args, host=host, port=free_port()),
                          capture_output=True, text=True, env=server_env(token, None), timeout=timeout)


@contextlib.contextmanager
def side_by_side(starts: dict[Hashable, ContextManager[ServerProcess]]) -> Iterator[dict[Hashable, ServerProcess]]:
    """Enter every server's context (`serve(...)`) at once, each in a thread, so that their start-ups (mostly
    imports on one core) overlap; {key: server}; all are stopped on exit (and all that started if one fails)."""
    from bench.scale_servers import start_all

    with contextlib.ExitStack() as stack:
        yield start_all(stack, starts)


class ServerPipeline:
    """Servers for a module's tests that each need their own: the next `ahead` servers (in `starts`' order) start in
    the background while a test runs, and a finished test's server stops in the background. A server's start-up is
    mostly imports on one core, so on CI's two cores this hides most of it; each test still gets a fresh server.

        pipeline = ServerPipeline({name: lambda: serve(bundle_of[name], token=T) for name in names})
        with pipeline.use(name) as server: ...
        pipeline.close()   # module teardown: stops whatever is still running
    """

    def __init__(self, starts: dict[Hashable, Callable[[], ContextManager[ServerProcess]]], ahead: int = 1):
        self._starts = dict(starts)
        self._order = list(self._starts)
        self._ahead = ahead
        self._pool = ThreadPoolExecutor(max_workers=ahead + 2, thread_name_prefix="stip-test-server")
        self._running: dict[Hashable, Future] = {}
        self._used: set[Hashable] = set()
        self._stops: list[Future] = []
        self.start_s = 0.0  # seconds the servers took to start, all together
        self.waited_s = 0.0  # of which the tests waited for (the rest ran beside a test)

    def _start(self, key: Hashable) -> Future:
        if key not in self._running:
            def enter():
                t0 = time.monotonic()
                cm = self._starts[key]()
                server = cm.__enter__()
                self.start_s += time.monotonic() - t0
                return cm, server
            self._running[key] = self._pool.submit(enter)
        return self._running[key]

    def _stop(self, future: Future) -> None:
        if future.exception() is None:
            cm, _ = future.result()
            cm.__exit__(None, None, None)

    @contextlib.contextmanager
    def use(self, key: Hashable) -> Iterator[ServerProcess]:
        """The server for `key` (started now if it was not ahead); it is stopped (in the background) on exit."""
        future = self._start(key)
        self._used.add(key)
        i = self._order.index(key)
        for nxt in self._order[i + 1:i + 1 + self._ahead]:
            if nxt not in self._used:
                self._start(nxt)
        t0 = time.monotonic()
        try:
            server = future.result()[1]
            self.waited_s += time.monotonic() - t0
            yield server
        finally:
            self._stops.append(self._pool.submit(self._stop, self._running.pop(key)))

    def close(self) -> None:
        """Stop every server still running (started ahead for a test that did not run) and wait for all stops."""
        for future in self._running.values():
            future.exception()  # wait for its start
            self._stops.append(self._pool.submit(self._stop, future))
        self._running.clear()
        for stop in self._stops:
            stop.result()
        self._pool.shutdown()
        print(f"ServerPipeline: servers took {self.start_s:.1f} s to start, tests waited {self.waited_s:.1f} s of it")
