"""What `stip protect --head client` costs (docs/head-client.md): bytes per token on the wire, and the client's
milliseconds per token for the LM-head matmul, for SmolLM2's head (49152 x 576) and a 7B-shaped one (32000 x 4096).

    python -m bench.head_client                                   # wire sizes and the head matmul, 1 thread
    python -m bench.head_client --end-to-end DIR                  # also: DIR, a `stip protect smollm2 --head client`
                                                                  # folder, served and run through stip.Client

Wire: the exact frames `stip.common.wire` builds for one decode step (the request the client sends, the reply the
server sends for each downlink), headers included, WebSocket framing (2-14 bytes a message) not. Client: a random
float16 head of each shape written as the bundle writes it, memory-mapped by `stip.client.head.ClientHead` as the
client does, then per token the matmul alone and the whole client reply (matmul, top 64, logsumexp), on one thread;
beside it the float16 matmul torch offers (faster where the CPU is shared, but it rounds the hidden state and the
logits to float16). The resident memory (VmRSS, its file-backed part RssFile) is read before the head is mapped,
after, and after its first use. Results: bench/results/head-client/head_client.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from stip.common import wire

SHAPES = {"SmolLM2-135M (49152 x 576)": (49152, 576), "7B-shaped (32000 x 4096)": (32000, 4096)}
TOP_K = 64
POSITION = 1000  # a four-digit position in the reply header, as in a long conversation
OUT = Path(__file__).resolve().parent / "results" / "head-client"


def wire_bytes(vocab: int, d: int) -> dict:
    """Bytes of one decode step's frames: the request (a float32 embedding row) and the reply per downlink."""
    def request(downlink: dict) -> int:
        x = torch.zeros(1, d)
        return len(wire.encode_frame(wire.request_header("decode", x.shape, torch.float32, None, downlink),
                                     wire.tensor_bytes(x)))

    def reply(kind: str, shape: list[int], dtype: str, payload: int) -> int:
        return len(wire.encode_frame({"ok": True, "kind": kind, "shape": shape, "dtype": dtype,
                                      "position": POSITION}, b"\0" * payload))

    return {
        f"top-k (k={TOP_K})": {"up": request({"kind": "topk", "k": TOP_K}),
                               "down": reply("topk", [1, TOP_K], "float32", TOP_K * 8 + 4)},
        "logits": {"up": request({"kind": "logits"}), "down": reply("logits", [1, vocab], "float32", vocab * 4)},
        "hidden (float32)": {"up": request({"kind": "hidden", "dtype": "float32"}),
                             "down": reply("hidden", [1, d], "float32", d * 4)},
        "hidden (float16)": {"up": request({"kind": "hidden", "dtype": "float16"}),
                             "down": reply("hidden", [1, d], "float16", d * 2)},
    }


def rss() -> dict:
    """This process's resident memory in MB: all of it, and the file-backed part (a mapped head's pages)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssFile", "RssAnon"):
            fields[name] = round(int(value.split()[0]) / 1024, 1)
    return fields


def _median_ms(fn, reps: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), [round(t, 2) for t in times]


def head_cost(vocab: int, d: int, reps: int, folder: Path) -> dict:
    """The client's per-token head work on a memory-mapped random float16 head of this shape, one thread."""
    from safetensors.torch import save_file

    from stip.client.head import ClientHead

    path = folder / f"head-{vocab}x{d}.safetensors"
    save_file({"weight": (torch.randn(vocab, d, generator=torch.Generator().manual_seed(0)) * 0.02).half()},
              str(path))
    before = rss()
    head = ClientHead(path)
    loaded = rss()
    h = torch.randn(1, d, generator=torch.Generator().manual_seed(1)) * 3
    t0 = time.perf_counter()
    logits = head.logits(h)
    first_ms = (time.perf_counter() - t0) * 1e3
    used = rss()
    matmul_ms, matmul_all = _median_ms(lambda: head.logits(h), reps)
    reply_ms, _ = _median_ms(lambda: head.reply(h, "topk", TOP_K, None), reps)
    half_ms, _ = _median_ms(lambda: torch.nn.functional.linear(h.half(), head.weight), reps)
    exact = h.double() @ head.weight.double().T
    half = torch.nn.functional.linear(h.half(), head.weight).double()
    out = {"rows": vocab, "cols": d, "head_mb": round(vocab * d * 2 / 1e6, 1),
           "first_call_ms": round(first_ms, 2), "matmul_ms": round(matmul_ms, 2), "matmul_ms_all": matmul_all,
           "reply_topk_ms": round(reply_ms, 2), "fp16_linear_ms": round(half_ms, 2),
           "head_gb_per_s": round(vocab * d * 2 / (matmul_ms / 1e3) / 1e9, 2),
           "max_abs_err_fp32_path": float((logits.double() - exact).abs().max()),
           "max_abs_err_fp16_linear": float((half - exact).abs().max()),
           "logit_scale": float(exact.abs().max()),
           "rss_mb": {"before_map": before, "after_map": loaded, "after_first_use": used}}
    del head, logits
    path.unlink()
    return out


def end_to_end(folder: Path, tokens: int) -> dict:
    """A `--head client` SmolLM2 folder served by a real `stip serve` and run through `stip.Client`: greedy against
    plain transformers, the bytes and client time per token it measured, and the prompt's logits against plain."""
    from stip.client.sdk import Client
    from stip.client.transport import Downlink
    from stip.models import load_plain_model
    from stip.reference import plain_greedy
    from stip.server.launch import local_server

    model, _ = load_plain_model("smollm2")
    with local_server(folder / "server", "--threads", "1") as server:
        client = Client(folder / "client", server.url)
        ids = client.encode(messages=[{"role": "user", "content": "Explain how photosynthesis works, step by step."}])
        want = plain_greedy(model, ids, tokens, client.bundle.eos_token_ids)
        g = client.generate(ids=ids, max_tokens=tokens)
        with client.connection.open_session() as s:
            r = s.prefill(client.bundle.embed(torch.tensor(ids)), positions="all", downlink=Downlink("logits"))
    with torch.no_grad():
        plain = model(torch.tensor([ids])).logits[0].float()
    got = client.bundle.plain_logits(r.logits)
    t = g.timing
    return {"prompt_tokens": len(ids), "generated": len(g.token_ids), "greedy_equals_plain": g.token_ids == want,
            "bytes_sent_per_token": round(t.bytes_sent_per_token, 1),
            "bytes_received_per_token": round(t.bytes_received_per_token, 1),
            "client_ms_per_token": round(t.client_ms_per_token, 2), "rtt_ms_per_token": round(t.rtt_ms_per_token, 2),
            "max_abs_logit_diff_vs_plain": float((got - plain).abs().max()),
            "logit_scale": float(plain.abs().max()),
            "top1_agreement": float((got.argmax(-1) == plain.argmax(-1)).float().mean())}


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"# `--head client`: what it costs", "",
             f"Command: `{doc['command']}`; commit {m['git_commit']}; {m['cpu']}, {m['cores']} cores "
             f"(load average {m['load_average_at_start']} at the start: a shared, loaded machine, so times are "
             f"upper bounds); torch {m['versions']['torch']}, {doc['threads']} thread; {doc['seconds']:.0f} s.", "",
             "## Bytes per decode token (one request frame up, one reply frame down; headers included)", "",
             "| head | downlink | up (B) | down (B) |", "|---|---|---|---|"]
    for shape, rows in doc["wire"].items():
        for kind, b in rows.items():
            lines.append(f"| {shape} | {kind} | {b['up']} | {b['down']} |")
    lines += ["", "## Client milliseconds per token (memory-mapped float16 head, 1 thread)", "",
              "| head | MB | matmul (ms) | + top-64, logsumexp (ms) | first call (ms) | GB/s | float16 linear (ms) "
              "| max err fp32 path | max err fp16 linear | logits up to |", "|---|---|---|---|---|---|---|---|---|---|"]
    for shape, c in doc["client"].items():
        lines.append(f"| {shape} | {c['head_mb']} | {c['matmul_ms']} | {c['reply_topk_ms']} | {c['first_call_ms']} "
                     f"| {c['head_gb_per_s']} | {c['fp16_linear_ms']} | {c['max_abs_err_fp32_path']:.1e} "
                     f"| {c['max_abs_err_fp16_linear']:.1e} | {c['logit_scale']:.1f} |")
    lines += ["", "Resident memory (MB) before mapping the head, after, and after its first use (RssFile: the "
              "file's pages, shared and reclaimable):", ""]
    for shape, c in doc["client"].items():
        r = c["rss_mb"]
        lines.append(f"- {shape}: VmRSS {r['before_map']['VmRSS']} -> {r['after_map']['VmRSS']} -> "
                     f"{r['after_first_use']['VmRSS']}; RssFile {r['before_map']['RssFile']} -> "
                     f"{r['after_map']['RssFile']} -> {r['after_first_use']['RssFile']}")
    if doc.get("end_to_end"):
        e = doc["end_to_end"]
        lines += ["", "## SmolLM2 end to end (`stip serve` + `stip.Client`, top-k downlink to the caller)", "",
                  f"{e['generated']} greedy tokens after a {e['prompt_tokens']}-token chat prompt: equal to plain "
                  f"transformers: {e['greedy_equals_plain']}. Per decode token: {e['bytes_sent_per_token']} B up, "
                  f"{e['bytes_received_per_token']} B down, client {e['client_ms_per_token']} ms (all of the "
                  f"client's compute, the head included, 1 thread; the server too), round trip "
                  f"{e['rtt_ms_per_token']} ms. Prompt logits: max |difference| from plain "
                  f"{e['max_abs_logit_diff_vs_plain']:.3g} (logits up to {e['logit_scale']:.1f}), top-1 agreement "
                  f"{e['top1_agreement']:.1%}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    import shlex

    from bench.report import machine_info

    ap = argparse.ArgumentParser(prog="python -m bench.head_client", description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20, help="timed calls per head shape (median reported)")
    ap.add_argument("--end-to-end", type=Path, default=None, help="a `stip protect smollm2 --head client` folder")
    ap.add_argument("--tokens", type=int, default=32, help="--end-to-end: tokens to generate")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    command = shlex.join(["python", "-m", "bench.head_client", *(sys.argv[1:] if argv is None else argv)])
    doc = {"command": command, "machine": machine_info(), "threads": torch.get_num_threads(),
           "wire": {name: wire_bytes(v, d) for name, (v, d) in SHAPES.items()}}
    with tempfile.TemporaryDirectory(prefix="stip-head-bench-") as tmp:
        doc["client"] = {name: head_cost(v, d, args.reps, Path(tmp)) for name, (v, d) in SHAPES.items()}
    if args.end_to_end is not None:
        doc["end_to_end"] = end_to_end(args.end_to_end, args.tokens)
    doc["seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "head_client.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "head_client.md").write_text(markdown(doc))
    sys.stdout.write(markdown(doc))
    return doc


if __name__ == "__main__":
    main()
