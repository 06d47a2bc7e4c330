"""Protect throughput and peak memory on a synthetic LLaMA-shaped checkpoint generated on disk.

The checkpoint (random fp32 weights, real LLaMA tensor names and shapes, one safetensors file as big models
ship in GB-sized shards) is written shard by shard so that generating it is bounded too. `stip protect` then runs as
a child process; its peak RSS is the kernel's `ru_maxrss` for children. Target: peak RSS < 3 x largest tensor +
1.5 GB.

    python -m bench.protect_bench [--size-gb 2.1] [--workdir /tmp/stip-protect-bench]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def llama_shape(target_bytes: float, dtype_bytes: int = 4) -> dict:
    """A LLaMA-1B-like config with as many layers as it takes to reach `target_bytes` (below 0.5 GB, a smaller
    width and vocabulary, so that a smoke run's checkpoint is as small as asked)."""
    d, ffn, vocab, heads, kv = (2048, 5632, 32000, 16, 4) if target_bytes >= 5e8 else (512, 1408, 8000, 8, 2)
    hd = d // heads
    per_layer = (2 * d * d + 2 * kv * hd * d + 3 * d * ffn + 2 * d) * dtype_bytes
    fixed = (2 * vocab * d + d) * dtype_bytes
    layers = max(1, int(-(-(target_bytes - fixed) // per_layer)))
    return dict(hidden_size=d, intermediate_size=ffn, vocab_size=vocab, num_attention_heads=heads,
                num_key_value_heads=kv, head_dim=hd, num_hidden_layers=layers, tie_word_embeddings=False,
                model_type="llama", architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5,
                max_position_embeddings=4096, rope_theta=10000.0, hidden_act="silu")


def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    d, ffn, v, hd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (q, d)), (p + "self_attn.k_proj.weight", (kv, d)),
                (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, q)),
                (p + "mlp.gate_proj.weight", (ffn, d)), (p + "mlp.up_proj.weight", (ffn, d)),
                (p + "mlp.down_proj.weight", (d, ffn)), (p + "input_layernorm.weight", (d,)),
                (p + "post_attention_layernorm.weight", (d,))]
    return out + [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def write_checkpoint(folder: Path, size_bytes: float, shard_bytes: float = 2.2e9) -> dict:
    """Write the synthetic model as safetensors shards with an index, one shard in memory at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    config = llama_shape(size_bytes)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shapes = tensor_shapes(config)
    g = torch.Generator().manual_seed(0)
    shards: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}

    def flush():
        save_file(current, str(folder / f"part-{len(shards)}.tmp"), metadata={"format": "pt"})
        shards.append(list(current))
        current.clear()

    for name, shape in shapes:
        t = torch.randn(shape, generator=g) * 0.02
        if current and sum(x.numel() * 4 for x in current.values()) + t.numel() * 4 > shard_bytes:
            flush()
        current[name] = t
    flush()
    weight_map = {}
    for i, names in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (folder / f"part-{i}.tmp").rename(folder / final)
        weight_map |= {name: final for name in names}
    total = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    largest = max(int(torch.Size(s).numel()) * 4 for _, s in shapes)
    return {"checkpoint_bytes": total, "largest_tensor_bytes": largest, "tensors": len(shapes),
            "layers": config["num_hidden_layers"], "shards": len(shards)}


_MEASURE = """
import json, resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def _peak_rss_of(cmd: list[str]) -> int:
    """Peak RSS of `cmd`, read by a small wrapper process: Linux keeps a forked child's pre-exec RSS in its
    ru_maxrss, so the process that spawns `cmd` must itself be small (this one has torch loaded)."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1])


def run(size_gb: float = 2.1, workdir: Path = Path("/tmp/stip-protect-bench"), keep: bool = False) -> dict:
    workdir = Path(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.perf_counter()
    # Generate in a child too: a child forked from a big parent inherits the parent's RSS in its ru_maxrss.
    gen = subprocess.run([sys.executable, "-m", "bench.protect_bench", "--generate-only", "--size-gb", str(size_gb),
                          "--workdir", str(workdir)], check=True, capture_output=True, text=True)
    info = json.loads(gen.stdout)
    gen_s = time.perf_counter() - t0
    cmd = [sys.executable, "-m", "stip.cli", "protect", str(workdir / "model"), "--out", str(workdir / "out"), "-q"]
    t0 = time.perf_counter()
    peak = _peak_rss_of(cmd)
    seconds = time.perf_counter() - t0
    bound = 3 * info["largest_tensor_bytes"] + 1.5e9
    result = {
        **info,
        "seconds": round(seconds, 2),
        "mb_per_s": round(info["checkpoint_bytes"] / 1e6 / seconds, 1),
        "peak_rss_bytes": peak,
        "peak_rss_gb": round(peak / 1e9, 3),
        "rss_bound_gb": round(bound / 1e9, 3),
        "within_bound": peak < bound,
        "generate_seconds": round(gen_s, 1),
        "command": " ".join(cmd[1:]),
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
    }
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=2.1)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/stip-protect-bench"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate_only:
        print(json.dumps(write_checkpoint(args.workdir / "model", args.size_gb * 1e9)))
        sys.exit(0)
    print(json.dumps(run(args.size_gb, args.workdir, args.keep), indent=2))
