"""Cost of one LLaMA-shaped decoder block under 2-party MPC (CrypTen) vs plain torch.

STIP's server runs the plain (permuted) model, so its per-block cost is that of
plain torch. This module measures how much slower the standard secure two-party
computation baseline is: CrypTen 0.4.1, weights secret-shared by party 0 (model
owner), input by party 1 (data owner), two real processes talking gloo over
loopback.

Install (fresh machine, torch already installed -- never let pip touch torch):

    pip install --no-deps crypten==0.4.1 omegaconf==2.4.0 PyYAML==6.0.4

CrypTen's declared deps (torchvision, onnx, pandas, scipy, sklearn, tensorboard,
future) are not needed for encrypted tensor arithmetic, hence ``--no-deps``
(``pip check`` will list them as missing; that is expected). ``import crypten``
really needs only ``omegaconf`` and ``yaml`` (omegaconf 2.4 vendors antlr4).

Shim: ``crypten.nn`` eagerly imports ``crypten/nn/onnx_converter.py``, which
needs the ``onnx`` package and, since ``torch.onnx.symbolic_registry`` is gone,
falls back to the private ``torch.onnx._internal.registration`` -- also gone
in recent torch (absent in 2.13). We never convert models, so
``_shim_onnx_converter`` puts a stub ``crypten.nn.onnx_converter`` into
``sys.modules`` before ``import crypten`` (no ``onnx`` install needed).

Run: ``python -m bench.mpc_crypten [--quick]`` prints a JSON dict (see ``run``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import types
from queue import Empty

import torch

SHAPES = {
    # SmolLM2-135M decoder block.
    "full": dict(d=576, n_heads=9, n_kv_heads=3, head_dim=64, m=1536, T=16),
    "quick": dict(d=64, n_heads=4, n_kv_heads=2, head_dim=16, m=128, T=4),
}
EPS = 1e-5
MASK_VALUE = -30.0  # CrypTen's exp is (1 + x/256)^256: keep x well above -256.
SEED = 0
PARTY_TIMEOUT_S = 600


def _shim_onnx_converter() -> None:
    """Stub crypten's ONNX converter when its imports (onnx, torch internals) are missing."""
    name = "crypten.nn.onnx_converter"
    if name in sys.modules:
        return
    try:
        import onnx  # noqa: F401
        import torch.onnx._internal.registration  # noqa: F401
        return
    except ImportError:
        pass

    def unavailable(*_args, **_kwargs):
        raise NotImplementedError("ONNX conversion is stubbed out by bench.mpc_crypten")

    stub = types.ModuleType(name)
    stub.from_onnx = stub.from_pytorch = stub.from_tensorflow = unavailable
    stub.TF_AND_TF2ONNX = False
    sys.modules[name] = stub


def _import_crypten():
    """Import crypten lazily so this module imports without it."""
    _shim_onnx_converter()
    import crypten

    return crypten


def make_inputs(shape: dict, seed: int = SEED):
    """Deterministic weights, input and public constants (identical in every process)."""
    d, h, kv, hd, m, t = (shape[k] for k in ("d", "n_heads", "n_kv_heads", "head_dim", "m", "T"))
    g = torch.Generator().manual_seed(seed)

    def lin(n_in, n_out):
        return torch.randn(n_in, n_out, generator=g) / math.sqrt(n_in)

    weights = {
        "ln1": 1 + 0.1 * torch.randn(d, generator=g),
        "wq": lin(d, h * hd), "wk": lin(d, kv * hd), "wv": lin(d, kv * hd),
        "wo": lin(h * hd, d),
        "ln2": 1 + 0.1 * torch.randn(d, generator=g),
        "w_gate": lin(d, m), "w_up": lin(d, m), "w_down": lin(m, d),
    }
    x = torch.randn(t, d, generator=g)
    return weights, x, _public_constants(shape)


def _public_constants(shape: dict) -> dict:
    """RoPE cos/sin, the rotate-half matrix and the causal mask: public, so cheap in MPC."""
    hd, t = shape["head_dim"], shape["T"]
    half = hd // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(t, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd), HF LLaMA layout
    rot = torch.zeros(hd, hd)  # x @ rot == cat(-x[half:], x[:half])
    rot[torch.arange(half) + half, torch.arange(half)] = -1.0
    rot[torch.arange(half), torch.arange(half) + half] = 1.0
    mask = torch.triu(torch.full((t, t), MASK_VALUE), diagonal=1)
    return {"cos": angles.cos(), "sin": angles.sin(), "rot": rot, "mask": mask}


def _rsqrt(v):
    """1/sqrt for torch tensors and CrypTensors alike."""
    return v.rsqrt() if torch.is_tensor(v) else v.inv_sqrt()


def _rms_norm(x, gain):
    return x * _rsqrt(x.square().mean(-1, keepdim=True) + EPS) * gain


def _rope(x, pub):
    """x: (heads, T, hd). Rotation by public cos/sin; rotate-half is a public matmul."""
    return x * pub["cos"] + x.matmul(pub["rot"]) * pub["sin"]


def block_forward(x, w, pub, shape):
    """One LLaMA decoder block; the same code runs on torch tensors and CrypTensors."""
    t, h, kv, hd = shape["T"], shape["n_heads"], shape["n_kv_heads"], shape["head_dim"]
    grp = h // kv
    a = _rms_norm(x, w["ln1"])
    q = _rope(a.matmul(w["wq"]).view(t, h, hd).transpose(0, 1), pub)  # (H, T, hd)
    k = _rope(a.matmul(w["wk"]).view(t, kv, hd).transpose(0, 1), pub)  # (KV, T, hd)
    v = a.matmul(w["wv"]).view(t, kv, hd).transpose(0, 1)
    # GQA without repeating K/V: fold each KV head's query group into the rows.
    q = q.reshape(kv, grp * t, hd) * (1.0 / math.sqrt(hd))
    scores = q.matmul(k.transpose(1, 2)).view(h, t, t) + pub["mask"]
    probs = scores.softmax(-1).view(kv, grp * t, t)
    ctx = probs.matmul(v).view(h, t, hd).transpose(0, 1).reshape(t, h * hd)
    x = x + ctx.matmul(w["wo"])
    b = _rms_norm(x, w["ln2"])
    gate = b.matmul(w["w_gate"])
    return x + (gate * gate.sigmoid() * b.matmul(w["w_up"])).matmul(w["w_down"])


def _party(rank: int, rendezvous: str, shape: dict, repeats: int, queue) -> None:
    """One MPC party (spawned process): share, warm up with comm logging, then time."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", RENDEZVOUS=rendezvous,
                      DISTRIBUTED_BACKEND="gloo")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)  # two parties share the machine's cores
    crypten = _import_crypten()
    crypten.init()
    comm = crypten.comm.get()
    weights, x, pub = make_inputs(shape)
    enc_w = {k: crypten.cryptensor(v, src=0) for k, v in weights.items()}  # model owner
    enc_x = crypten.cryptensor(x, src=1)  # data owner

    crypten.cfg.communicator.verbose = True  # count traffic of the warm-up forward only
    comm.reset_communication_stats()
    out = block_forward(enc_x, enc_w, pub, shape)
    stats = comm.get_communication_stats()
    crypten.cfg.communicator.verbose = False
    plain_out = out.get_plain_text()

    times = []
    for _ in range(repeats):
        comm.barrier()
        t0 = time.perf_counter()
        block_forward(enc_x, enc_w, pub, shape)
        times.append(time.perf_counter() - t0)
    crypten.uninit()
    queue.put((rank, {"times": times, "bytes": stats["bytes"], "rounds": stats["rounds"],
                      "out": plain_out if rank == 0 else None}))


def run_mpc(shape: dict, repeats: int) -> dict:
    """Launch the two parties as separate processes and gather their results."""
    if importlib.util.find_spec("crypten") is None:  # fail here, not inside both children
        raise ImportError("crypten is not installed; see the bench.mpc_crypten docstring")
    ctx = mp.get_context("spawn")  # no fork of a torch process with live thread pools
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        rendezvous = "file://" + os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_party, args=(r, rendezvous, shape, repeats, queue))
                 for r in range(2)]
        for p in procs:
            p.start()
        try:
            results = _collect(queue, procs)
            for p in procs:
                p.join()
        finally:
            for p in procs:
                if p.is_alive():  # a crashed peer leaves the other blocked in gloo
                    p.terminate()
    return results


def _collect(queue, procs) -> dict:
    """Read one result per party, failing fast if a party dies or the run hangs."""
    results, deadline = {}, time.monotonic() + PARTY_TIMEOUT_S
    while len(results) < len(procs):
        try:
            rank, result = queue.get(timeout=1.0)
            results[rank] = result
        except Empty:
            codes = [p.exitcode for p in procs]
            if any(c not in (None, 0) for c in codes):
                raise RuntimeError(f"MPC party failed: exit codes {codes}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"MPC parties gave no result in {PARTY_TIMEOUT_S} s")
    return results


def time_plain(shape: dict, repeats: int = 200):
    """Median fp32 wall time of the block in plain torch, plus its output."""
    weights, x, pub = make_inputs(shape)
    with torch.inference_mode():
        out = block_forward(x, weights, pub, shape)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            block_forward(x, weights, pub, shape)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run(quick: bool = False, repeats: int = 3) -> dict:
    """Benchmark MPC vs plain for one block; returns a JSON-serialisable dict."""
    shape = SHAPES["quick" if quick else "full"]
    parties = run_mpc(shape, repeats)
    plain_s, plain_out = time_plain(shape)
    mpc_all = parties[0]["times"]
    mpc_s = statistics.median(mpc_all)
    return {
        "shape": dict(shape),
        "mode": "quick" if quick else "full",
        "protocol": "CrypTen 0.4.1, 2 parties, beaver/TFP, gloo loopback, 16-bit fixed point",
        "threads": {"mpc_per_party": 1, "plain": torch.get_num_threads()},
        "mpc_seconds": mpc_s,
        "mpc_seconds_all": mpc_all,
        "plain_seconds": plain_s,
        "speedup": mpc_s / plain_s,
        "max_abs_error": float((parties[0]["out"] - plain_out).abs().max()),
        "plain_output_max_abs": float(plain_out.abs().max()),
        # Each party logs what it sends and receives; halve the sum to count each byte once.
        "comm_bytes": int((parties[0]["bytes"] + parties[1]["bytes"]) / 2),
        "rounds": parties[0]["rounds"],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shape, for CI")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(json.dumps(run(quick=args.quick, repeats=args.repeats), indent=2))


if __name__ == "__main__":
    main()
