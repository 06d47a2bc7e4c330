"""A simulated network between the STIP client and server: a TCP relay that adds one-way delay and a bandwidth limit.

    client --TCP--> relay (delay + rate, each direction) --TCP--> stip serve

Each direction is a link: bytes are serialised at `mbit` Mbit/s, first in first out (a token bucket one chunk deep:
a chunk starts transmitting when the previous one has left), then propagate for `rtt_ms / 2` before they are written
on. So a message of n bytes arrives n * 8 / rate + rtt / 2 after it was sent, and messages queue behind each other
as on a real link. TCP's own dynamics (slow start, congestion control) are not modelled: the STIP session is one
persistent connection, so its window is open anyway. Loss (`--loss P`, off by default) is modelled by what it costs
TCP in time: each 1448-byte segment of a chunk is lost with probability P (seeded), and a chunk holding a lost segment
is delivered late by the recovery a Linux sender takes, one RTT (fast retransmit) where at least 3 segments follow
the lost one in the chunk, else the tail-loss probe's max(2 RTT, 10 ms); chunks behind it wait (in-order delivery).
The congestion window's halving after a loss is not modelled.

The relay uses two threads per direction, not an asyncio loop: asyncio waits on epoll, whose timeout has a resolution
of 1 ms, which is larger than the one-way delay of a wired LAN (0.1-0.5 ms). A thread sleeps to within ~0.1 ms and
spins for the last 0.2 ms. It runs as its own process (`python -m bench.netsim`) so that it never competes with the
client for the GIL; `calibrate` measures what the relay actually delivers (round trip of a small message, throughput
of a 4 MB transfer) so that results can state the effective link, not only the configured one.

    python -m bench.netsim --target 127.0.0.1:8000 --rtt-ms 10 --mbit 50 [--port 0]   # prints "READY <port>"
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CHUNK = 64 * 1024
SPIN_S = 0.0002
MSS = 1448  # bytes of payload per TCP segment on a 1500-byte MTU with timestamps


@dataclass(frozen=True)
class NetProfile:
    name: str
    label: str
    rtt_ms: float  # round trip propagation (half each way), on top of loopback
    mbit: float  # link rate each way, Mbit/s (0: unlimited)
    loss: float = 0.0  # probability that a segment is lost (its recovery delay modelled, see the module's docstring)

    def as_dict(self) -> dict:
        return asdict(self)


# The two settings of the paper's evaluation: a wired LAN and a wireless link.
PROFILES = {
    "lan": NetProfile("lan", "wired LAN (1 Gbit/s, 0.5 ms RTT)", rtt_ms=0.5, mbit=1000.0),
    "wifi": NetProfile("wifi", "wireless (50 Mbit/s, 10 ms RTT)", rtt_ms=10.0, mbit=50.0),
}


def _sleep_until(deadline: float) -> None:
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            return
        if left > SPIN_S:
            time.sleep(left - SPIN_S)


class _Direction:
    """One direction of the link: a reader that stamps each chunk with its delivery time, a writer that waits."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay_s: float, bytes_per_s: float, on_done,
                 loss: float = 0.0, seed: int = 0):
        self.src, self.dst, self.delay, self.rate, self.on_done = src, dst, delay_s, bytes_per_s, on_done
        self.loss, self.rng = loss, random.Random(seed)
        self.queue: collections.deque = collections.deque()
        self.cv = threading.Condition()
        self.link_free = 0.0
        self.bytes = 0

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _push(self, item) -> None:
        with self.cv:
            self.queue.append(item)
            self.cv.notify()

    def _read(self) -> None:
        try:
            while True:
                data = self.src.recv(CHUNK)
                now = time.perf_counter()
                if not data:
                    break
                self.bytes += len(data)
                start = max(now, self.link_free)
                self.link_free = start + (len(data) / self.rate if self.rate else 0.0)
                self._push((self.link_free + self.delay + self._recovery(len(data)), data))
        except OSError:
            pass
        self._push((0.0, None))

    def _recovery(self, n: int) -> float:
        """Seconds a chunk of n bytes is delivered late by the loss of one of its segments (0 if none is lost)."""
        if not self.loss:
            return 0.0
        segments = math.ceil(n / MSS)
        lost = next((i for i in range(segments) if self.rng.random() < self.loss), None)
        if lost is None:
            return 0.0
        rtt = 2 * self.delay
        return rtt if segments - lost - 1 >= 3 else max(2 * rtt, 0.010)

    def _write(self) -> None:
        try:
            while True:
                with self.cv:
                    while not self.queue:
                        self.cv.wait()
                    deliver, data = self.queue.popleft()
                if data is None:
                    with contextlib.suppress(OSError):
                        self.dst.shutdown(socket.SHUT_WR)
                    break
                _sleep_until(deliver)
                self.dst.sendall(data)
        except OSError:
            pass
        self.on_done()


class Relay:
    """Listen on `host:port`; every accepted connection is relayed to `target` through a simulated link."""

    def __init__(self, target: tuple[str, int], rtt_ms: float, mbit: float, host: str = "127.0.0.1", port: int = 0,
                 loss: float = 0.0, seed: int = 0):
        self.target, self.loss, self.seed = target, loss, seed
        self.delay_s = rtt_ms / 2000.0
        self.bytes_per_s = mbit * 1e6 / 8 if mbit else 0.0
        self.sock = socket.create_server((host, port))
        self.port = self.sock.getsockname()[1]
        self.connections = 0

    def serve_forever(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._relay, args=(client, self.connections), daemon=True).start()

    def start(self) -> "Relay":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _relay(self, client: socket.socket, number: int = 0) -> None:
        try:
            server = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending = [2]
        lock = threading.Lock()

        def done():
            with lock:
                pending[0] -= 1
                if pending[0] == 0:
                    client.close()
                    server.close()

        seed = self.seed + 2 * number  # each connection draws its own losses, reproducibly
        _Direction(client, server, self.delay_s, self.bytes_per_s, done, self.loss, seed).start()  # uplink
        _Direction(server, client, self.delay_s, self.bytes_per_s, done, self.loss, seed + 1).start()  # downlink


@contextlib.contextmanager
def relay_process(target_port: int, profile: NetProfile, target_host: str = "127.0.0.1"):
    """The relay as a child process; yields its listening port."""
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "bench.netsim", "--target", f"{target_host}:{target_port}",
                             "--rtt-ms", str(profile.rtt_ms), "--mbit", str(profile.mbit),
                             *(["--loss", str(profile.loss)] if profile.loss else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=repo)
    try:
        line = proc.stdout.readline()
        if not line.startswith("READY"):
            proc.kill()
            raise RuntimeError(f"netsim relay did not start: {line!r} {proc.stderr.read()}")
        yield int(line.split()[1])
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _echo_server() -> tuple[socket.socket, int]:
    """A loopback echo server (for calibration): echoes every byte back."""
    sock = socket.create_server(("127.0.0.1", 0))

    def handle(c):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with c:
            while data := c.recv(CHUNK):
                c.sendall(data)

    def serve():
        while True:
            try:
                c, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(c,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return sock, sock.getsockname()[1]


def _recv_exactly(s: socket.socket, n: int) -> None:
    while n > 0:
        got = len(s.recv(min(n, CHUNK)))
        if not got:
            raise ConnectionError("echo connection closed")
        n -= got


def calibrate(profile: NetProfile, pings: int = 20, transfer_bytes: int = 4 << 20) -> dict:
    """What the relay process really delivers: median round trip of a 64-byte message, and the throughput of a
    one-way `transfer_bytes` transfer (echoed back: the two directions overlap, so this is the one-way rate)."""
    sock, port = _echo_server()
    try:
        with relay_process(port, profile) as relay_port:
            with socket.create_connection(("127.0.0.1", relay_port)) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                rtts = []
                for _ in range(pings):
                    t0 = time.perf_counter()
                    s.sendall(b"x" * 64)
                    _recv_exactly(s, 64)
                    rtts.append((time.perf_counter() - t0) * 1e3)
                if profile.mbit and profile.mbit < 200:
                    transfer_bytes = min(transfer_bytes, 1 << 20)  # a slow link: keep the calibration short
                blob = b"y" * transfer_bytes
                t0 = time.perf_counter()
                sender = threading.Thread(target=s.sendall, args=(blob,))
                sender.start()
                _recv_exactly(s, transfer_bytes)
                sender.join()
                seconds = time.perf_counter() - t0 - statistics.median(rtts) / 1e3
    finally:
        sock.close()
    return {"rtt_ms": round(statistics.median(rtts), 3), "rtt_ms_min": round(min(rtts), 3),
            "rtt_ms_max": round(max(rtts), 3), "mbit": round(transfer_bytes * 8 / max(seconds, 1e-9) / 1e6, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", help="host:port to relay to")
    ap.add_argument("--rtt-ms", type=float, required=True, help="added round-trip delay (half each way)")
    ap.add_argument("--mbit", type=float, default=0.0, help="link rate each way in Mbit/s (0: unlimited)")
    ap.add_argument("--loss", type=float, default=0.0, help="probability a TCP segment is lost (0: none)")
    ap.add_argument("--seed", type=int, default=0, help="the loss draws' seed")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--calibrate", action="store_true", help="measure the link instead of relaying")
    args = ap.parse_args(argv)
    if args.calibrate:
        print(calibrate(NetProfile("cli", "cli", args.rtt_ms, args.mbit, args.loss)))
        return
    if not args.target:
        ap.error("--target is required (unless --calibrate)")
    host, port = args.target.rsplit(":", 1)
    relay = Relay((host, int(port)), args.rtt_ms, args.mbit, port=args.port, loss=args.loss, seed=args.seed)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"READY {relay.port}", flush=True)
    try:
        relay.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
