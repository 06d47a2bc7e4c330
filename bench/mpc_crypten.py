"""Cost of one LLaMA-shaped decoder block under 2-party MPC (CrypTen) vs plain torch, per decoded token.

STIP's server runs the plain (permuted) model, so its per-block cost is that of
plain torch. This module measures how much slower the standard secure two-party
computation baseline is: CrypTen 0.4.1, weights secret-shared by party 0 (model
owner), input by party 1 (data owner), two real processes talking gloo over
loopback.

Two steps of the same block, each timed under MPC and in plain torch:

* decode (the headline, per generated token as the end-to-end table): one new
  token at position T attends to a secret-shared KV cache of T tokens (the
  cache's K/V come from the plain block on T earlier tokens and are shared, as
  an MPC generation would hold them);
* prefill (secondary): T tokens through the block at once, causal mask.

`extrapolated` multiplies one block by the model's layer count: an
extrapolation (embedding, final norm and LM head are left out), not a
measurement of the whole model.

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
    "full": dict(d=576, n_heads=9, n_kv_heads=3, head_dim=64, m=1536, T=16, layers=30),
    "quick": dict(d=64, n_heads=4, n_kv_heads=2, head_dim=16, m=128, T=4, layers=2),
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
    """Deterministic weights, input (T + 1 tokens: T for prefill, then one to decode) and public constants
    (identical in every process)."""
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
    x = torch.randn(t + 1, d, generator=g)
    return weights, x, _public_constants(shape)


def _public_constants(shape: dict) -> dict:
    """RoPE cos/sin of positions 0..T, the rotate-half matrix and the causal mask of T tokens: public, so cheap in
    MPC."""
    hd, t = shape["head_dim"], shape["T"]
    half = hd // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(t + 1, dtype=torch.float32), inv_freq)
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


def _rope(x, pub, start: int):
    """x: (heads, n, hd) at positions start..start+n-1. Rotation by public cos/sin; rotate-half is a public matmul."""
    n = x.size(1)
    return x * pub["cos"][start:start + n] + x.matmul(pub["rot"]) * pub["sin"][start:start + n]


def _cat(xs, dim: int):
    """torch.cat for torch tensors, crypten.cat for CrypTensors."""
    if torch.is_tensor(xs[0]):
        return torch.cat(xs, dim)
    import crypten

    return crypten.cat(xs, dim)


def _qkv(a, w, pub, shape, start: int):
    """Q (H, n, hd), K and V (KV, n, hd) of the normed input a (n, d) at positions start..start+n-1."""
    h, kv, hd = shape["n_heads"], shape["n_kv_heads"], shape["head_dim"]
    n = a.size(0)
    q = _rope(a.matmul(w["wq"]).view(n, h, hd).transpose(0, 1), pub, start)
    k = _rope(a.matmul(w["wk"]).view(n, kv, hd).transpose(0, 1), pub, start)
    return q, k, a.matmul(w["wv"]).view(n, kv, hd).transpose(0, 1)


def _attend(x, q, k, v, w, shape, mask=None):
    """Attention of q over k/v (causal `mask` or none), output projection, residual, then the MLP."""
    h, kv, hd = shape["n_heads"], shape["n_kv_heads"], shape["head_dim"]
    grp, n, ctx_len = h // kv, q.size(1), k.size(1)
    # GQA without repeating K/V: fold each KV head's query group into the rows.
    q = q.reshape(kv, grp * n, hd) * (1.0 / math.sqrt(hd))
    scores = q.matmul(k.transpose(1, 2)).view(h, n, ctx_len)
    if mask is not None:
        scores = scores + mask
    probs = scores.softmax(-1).view(kv, grp * n, ctx_len)
    ctx = probs.matmul(v).view(h, n, hd).transpose(0, 1).reshape(n, h * hd)
    x = x + ctx.matmul(w["wo"])
    b = _rms_norm(x, w["ln2"])
    gate = b.matmul(w["w_gate"])
    return x + (gate * gate.sigmoid() * b.matmul(w["w_up"])).matmul(w["w_down"])


def block_forward(x, w, pub, shape):
    """Prefill: one LLaMA decoder block over T tokens; the same code runs on torch tensors and CrypTensors."""
    q, k, v = _qkv(_rms_norm(x, w["ln1"]), w, pub, shape, 0)
    return _attend(x, q, k, v, w, shape, pub["mask"])


def kv_cache(x, w, pub, shape):
    """The block's K and V (KV, T, hd) of the T tokens x: what a generation holds after the prefill."""
    _, k, v = _qkv(_rms_norm(x, w["ln1"]), w, pub, shape, 0)
    return k, v


def block_decode(x, k_cache, v_cache, w, pub, shape):
    """Decode: one token x (1, d) at position T attends to the cached K/V (KV, T, hd) and to itself."""
    q, k, v = _qkv(_rms_norm(x, w["ln1"]), w, pub, shape, k_cache.size(1))
    return _attend(x, q, _cat([k_cache, k], 1), _cat([v_cache, v], 1), w, shape)


def _timed(comm, crypten, fn, repeats: int) -> dict:
    """One warm-up call with communication logging, then `repeats` timed calls between barriers."""
    crypten.cfg.communicator.verbose = True  # count traffic of the warm-up call only
    comm.reset_communication_stats()
    out = fn()
    stats = comm.get_communication_stats()
    crypten.cfg.communicator.verbose = False
    plain_out = out.get_plain_text()
    times = []
    for _ in range(repeats):
        comm.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"times": times, "bytes": stats["bytes"], "rounds": stats["rounds"], "out": plain_out}


def _party(rank: int, rendezvous: str, shape: dict, repeats: int, queue) -> None:
    """One MPC party (spawned process): share, then time the decode step and the prefill."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", RENDEZVOUS=rendezvous,
                      DISTRIBUTED_BACKEND="gloo")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)  # two parties share the machine's cores
    crypten = _import_crypten()
    crypten.init()
    comm = crypten.comm.get()
    weights, x, pub = make_inputs(shape)
    t = shape["T"]
    k, v = kv_cache(x[:t], weights, pub, shape)
    enc_w = {name: crypten.cryptensor(w, src=0) for name, w in weights.items()}  # model owner
    enc_prompt = crypten.cryptensor(x[:t], src=1)  # data owner
    enc_new = crypten.cryptensor(x[t:], src=1)
    enc_k, enc_v = crypten.cryptensor(k, src=1), crypten.cryptensor(v, src=1)  # the generation's shared KV cache
    result = {"decode": _timed(comm, crypten, lambda: block_decode(enc_new, enc_k, enc_v, enc_w, pub, shape),
                               repeats),
              "prefill": _timed(comm, crypten, lambda: block_forward(enc_prompt, enc_w, pub, shape), repeats)}
    crypten.uninit()
    if rank != 0:
        for r in result.values():
            r["out"] = None
    queue.put((rank, result))


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


def time_plain(fn, repeats: int = 200, threads: int = 1):
    """Median fp32 wall time of `fn()` in plain torch on `threads` threads (one, as each MPC party has: for ops this
    small more threads only add synchronisation, which a busy machine turns into milliseconds), plus its output."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            out = fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return statistics.median(times), out


def run(quick: bool = False, repeats: int = 3) -> dict:
    """Benchmark MPC vs plain for one block, decode step and prefill; returns a JSON-serialisable dict."""
    shape = SHAPES["quick" if quick else "full"]
    t = shape["T"]
    parties = run_mpc(shape, repeats)
    weights, x, pub = make_inputs(shape)
    k, v = kv_cache(x[:t], weights, pub, shape)
    plain = {"decode": time_plain(lambda: block_decode(x[t:], k, v, weights, pub, shape)),
             "prefill": time_plain(lambda: block_forward(x[:t], weights, pub, shape))}
    steps = {}
    for step, (plain_s, plain_out) in plain.items():
        p0, p1 = parties[0][step], parties[1][step]
        mpc_s = statistics.median(p0["times"])
        steps[step] = {
            "tokens": 1 if step == "decode" else t,
            "context": t if step == "decode" else 0,
            "mpc_seconds": mpc_s,
            "mpc_seconds_all": p0["times"],
            "plain_seconds": plain_s,
            "speedup": mpc_s / plain_s,
            "max_abs_error": float((p0["out"] - plain_out).abs().max()),
            "plain_output_max_abs": float(plain_out.abs().max()),
            # Each party logs what it sends and receives; halve the sum to count each byte once.
            "comm_bytes": int((p0["bytes"] + p1["bytes"]) / 2),
            "rounds": p0["rounds"],
        }
    dec, layers = steps["decode"], shape["layers"]
    return {
        "shape": dict(shape),
        "mode": "quick" if quick else "full",
        "protocol": "CrypTen 0.4.1, 2 parties, beaver/TFP, gloo loopback, 16-bit fixed point",
        "threads": {"mpc_per_party": 1, "plain": 1},
        "decode": dec,
        "prefill": steps["prefill"],
        "extrapolated": {"layers": layers, "mpc_seconds_per_token": dec["mpc_seconds"] * layers,
                         "plain_seconds_per_token": dec["plain_seconds"] * layers,
                         "comm_bytes_per_token": dec["comm_bytes"] * layers, "rounds_per_token": dec["rounds"] * layers,
                         "note": f"one block's decode step x {layers} layers: an extrapolation, not a measurement "
                                 f"(embedding, final norm and LM head left out)"},
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shape, for CI")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(json.dumps(run(quick=args.quick, repeats=args.repeats), indent=2))


if __name__ == "__main__":
    main()
