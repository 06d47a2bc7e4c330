"""The audit's users in TEE mode: prompts through the real TEE path on loopback, and what the worker received.

    from stip.audit.tee_capture import capture_tee_traffic
    traffic = capture_tee_traffic("protected/", prompts)     # a folder `stip protect MODEL --tee` wrote

It starts a real `stip serve DIR/server --tee-worker --capture TMP` (on a copy holding only the TEE worker bundle,
as a worker host would) and a real `stip enclave DIR/enclave` beside it, and sends each prompt through the real TEE
client (`stip.client.tee.TeeClient`, `DIR/tee-client`: attestation, the sealed channel; greedy, the prefill plus
`generate` decode steps, one session each). What comes back is the attacker's view, read back from the capture
(`stip.audit.capture`): `h1 p` as the observations' inputs, the body's hidden states, the padded linear rows; and,
apart, the auditor's truth (the token ids of every observed row).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from stip.audit.capture import read_capture, read_index, read_offload
from stip.audit.context import Observation
from stip.errors import StipError

TEE_PARTS = ("server", "enclave", "tee-client", "tee-platform", "client", "developer")
CAPTURE_WAIT_S = 60.0  # the last step of a session is written when the enclave closes it, after the client's reply


@dataclass
class TeeTraffic:
    """What the TEE worker received (observations, and per observation its padded linear rows) and the truth."""

    observations: list[Observation]  # inputs: h1 p [T, d]; hidden: {layer: [T, d]}, layer 0 being h1 p
    offload: list[dict[str, torch.Tensor]]  # per observation: {linear name: padded rows [n, d_in], float64}
    truth_ids: list[torch.Tensor]  # per observation: the [T] token ids of its rows (the auditor's)
    contexts: list[list[int]]  # per request: prompt ids + generated ids
    seconds: float = 0.0
    worker_log: str = field(default="", repr=False)


def check_tee_bundle(bundle_dir: str | Path) -> Path:
    """A folder `stip protect MODEL --tee` wrote (server/ is a TEE worker bundle); a StipError names what is wrong."""
    bundle_dir = Path(bundle_dir)
    missing = [part for part in TEE_PARTS if not (bundle_dir / part).is_dir()]
    if missing:
        raise StipError(f"{bundle_dir} has no {', '.join(missing)}: give the whole folder `stip protect MODEL --out "
                        f"DIR --tee` wrote (the audit plays the users, the enclave and the worker)")
    manifest = json.loads((bundle_dir / "server" / "stip-manifest.json").read_text())
    if manifest.get("mode") != "tee-worker":
        raise StipError(f"{bundle_dir}/server is a {manifest.get('mode', 'round-trip')} bundle, not a TEE worker "
                        f"bundle: protect the model with --tee")
    return bundle_dir


@contextlib.contextmanager
def worker_only_bundle(server_dir: Path) -> Iterator[Path]:
    """A temporary folder with only the TEE worker bundle's files (hard links where possible): the worker is given
    nothing else, as on a real worker host."""
    with tempfile.TemporaryDirectory(prefix="stip-tee-worker-") as tmp:
        dst = Path(tmp) / "server"
        dst.mkdir()
        for f in Path(server_dir).iterdir():
            if f.is_file():
                try:
                    os.link(f, dst / f.name)
                except OSError:
                    shutil.copy2(f, dst / f.name)
        yield dst


@contextlib.contextmanager
def tee_processes(bundle_dir: Path, capture_dir: Path, capture_layers: str | None = None,
                  threads: int | None = None) -> Iterator[tuple[object, object, str]]:
    """A real capturing `stip serve --tee-worker` and a real `stip enclave` on loopback: (worker, enclave, the
    client token the enclave requires)."""
    from stip.server.launch import local_process, local_server

    worker_token, client_token = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    args = ["--tee-worker", "--capture", str(capture_dir)]
    if capture_layers:
        args += ["--capture-layers", str(capture_layers)]
    if threads:
        args += ["--threads", str(threads)]

    def enclave_command(url: str):
        return lambda port: [sys.executable, "-m", "stip.cli", "enclave", str(bundle_dir / "enclave"), "--worker",
                             url, "--port", str(port), "--platform-key",
                             str(bundle_dir / "tee-platform" / "platform.key")]

    env = {"OMP_NUM_THREADS": str(threads)} if threads else None
    with worker_only_bundle(bundle_dir / "server") as server_dir, \
            local_server(server_dir, *args, token=worker_token) as worker, \
            local_process(enclave_command(worker.url), "/health",
                          env={"STIP_WORKER_TOKEN": worker_token, "STIP_TOKEN": client_token, **(env or {})}
                          ) as enclave:
        yield worker, enclave, client_token


def _wait_for_steps(capture_dir: Path, expected: int, timeout: float = CAPTURE_WAIT_S) -> int:
    """Index lines once at least `expected` are written (or the timeout passes): the enclave closes a session, which
    writes its last step, only after the client has its last token."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            n = len(read_index(capture_dir))
        except StipError:
            n = 0
        if n >= expected or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def capture_tee_traffic(bundle_dir: str | Path, prompts: list[list[int]], generate: int = 1,
                        capture_layers: str | list[int] | None = None, threads: int | None = None,
                        keep_capture: str | Path | None = None) -> TeeTraffic:
    """Send each prompt (token ids) through TeeClient -> `stip enclave` -> a capturing `stip serve --tee-worker`,
    greedy, `generate` decode steps after the prefill, one session each; read back what the worker received.
    `keep_capture`: copy the raw capture folder there."""
    from stip.audit.run import truth_ids
    from stip.client.tee import TeeClient

    bundle_dir = check_tee_bundle(bundle_dir)
    if isinstance(capture_layers, (list, tuple)):
        capture_layers = ",".join(str(int(x)) for x in capture_layers)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stip-tee-audit-") as tmp:
        capture_dir = Path(tmp) / "capture"
        contexts, steps = [], 0
        with tee_processes(bundle_dir, capture_dir, capture_layers, threads) as (worker, enclave, client_token):
            client = TeeClient(bundle_dir / "tee-client", enclave.url, allow_simulated=True, token=client_token)
            for ids in prompts:
                gen = client.generate(ids=list(ids), max_tokens=generate + 1, temperature=0.0)
                contexts.append(list(ids) + list(gen.token_ids))
                steps += max(1, len(gen.token_ids))  # the prefill, then one step per token fed back
            written = _wait_for_steps(capture_dir, steps)
            worker_log = worker.log() if hasattr(worker, "log") else ""
        if written < steps:
            raise StipError(f"the TEE worker's capture holds {written} steps; {steps} were sent")
        observations = read_capture(capture_dir)
        offload = read_offload(capture_dir)
        if keep_capture is not None:
            shutil.copytree(capture_dir, keep_capture)
    return TeeTraffic(observations, offload, truth_ids(observations, contexts), contexts,
                      time.perf_counter() - t0, worker_log)
