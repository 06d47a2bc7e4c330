"""Per-token latency of TEE mode against plain STIP round-trip mode, in one run, on one machine.

    .venv/bin/python -m bench.tee_latency --model smollm2 --tokens 32 --out bench/results/tee/latency.json

Both modes run the same protected model through real `stip serve` processes on loopback: round-trip mode is a
`stip.Client` against `stip serve DIR/server`; TEE mode is the enclave's part (stip.enclave.compute.EnclaveModel, in
this process) against `stip serve DIR/server --tee-worker` over its WebSocket. The TEE figure is split into the
enclave's compute (block 0 with its pad arithmetic, the final norm, un-permuting), the worker's compute (as the
worker reports it) and the enclave-worker channel (socket time minus worker compute). Not included: the client to
enclave channel (one AEAD frame per token each way, stip.common.channel) and attestation (once per connection).
Decode steps only (the prompt's prefill is reported apart); greedy; the same number of tokens in both modes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "Explain in one paragraph why the sky is blue."


def protect(model: str, folder: Path) -> tuple[Path, list[int]]:
    import stip
    from stip.models import resolve_model

    if model == "smollm2":
        stip.protect(resolve_model("smollm2"), folder / "protected", progress=False)
        from stip.client.bundle import ClientBundle

        tok = ClientBundle.load(folder / "protected" / "client").tokenizer
        ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        from tests.models import save_tiny

        stip.protect(save_tiny(model, folder / "plain"), folder / "protected", progress=False)
        ids = [3, 14, 15, 9, 26, 5, 35, 8] * 4
    return folder / "protected", ids


def round_trip(out: Path, ids: list[int], tokens: int, threads: int) -> dict:
    from stip.client.sdk import Client
    from tests.parties import serve

    with serve(out, threads=threads) as server:
        client = Client(out / "client", server.url)
        client.generate(ids=ids, max_tokens=2)  # warm-up
        g = client.generate(ids=ids, max_tokens=tokens)  # may stop early at EOS: TEE mode then runs as many
        t = g.timing
        return {"tokens": t.steps, "prefill_ms": t.prefill_ms,
                "per_token_ms": (t.total_ms - t.prefill_ms) / max(1, t.steps),
                "server_ms_per_token": t.server_ms_per_token, "wire_ms_per_token": t.wire_ms_per_token,
                "client_ms_per_token": t.client_ms_per_token, "ids": g.token_ids}


def tee(out: Path, ids: list[int], tokens: int, threads: int) -> dict:
    from stip.enclave.compute import EnclaveModel, enclave_tensors_from_bundles
    from stip.enclave.worker_link import WebSocketWorkerLink
    from tests.parties import serve

    config, tensors = enclave_tensors_from_bundles(out)
    with serve(out, "--tee-worker", threads=threads) as worker:
        link = WebSocketWorkerLink(worker.url)
        model = EnclaveModel.from_tensors(config, tensors, link)
        for _ in model.generate(ids, _greedy(2)):  # warm-up
            pass
        s = model.new_session()
        t0 = time.perf_counter()
        logits = model.prefill(s, ids)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        out_ids = [int(logits.argmax())]
        base = dict(s.timings)
        w_ms, call_s = link.worker_ms, link.calls_s
        t0 = time.perf_counter()
        for _ in range(tokens - 1):
            out_ids.append(int(model.decode(s, out_ids[-1]).argmax()))
        total = (time.perf_counter() - t0) * 1e3
        steps = tokens - 1
        worker_ms = link.worker_ms - w_ms
        link_ms = (link.calls_s - call_s) * 1e3
        enclave_ms = (s.timings["enclave_s"] - base["enclave_s"]) * 1e3
        model.close(s)
        link.shutdown()
        return {"tokens": steps, "prefill_ms": prefill_ms, "per_token_ms": total / steps,
                "enclave_ms_per_token": enclave_ms / steps, "worker_ms_per_token": worker_ms / steps,
                "channel_ms_per_token": (link_ms - worker_ms) / steps,
                "ids": out_ids}


def _greedy(n: int):
    from stip.common.sampling import SamplingParams

    return SamplingParams(max_tokens=n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2, or a tiny config name from tests/models.py")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each server process")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="stip-tee-bench-") as tmp:
        out, ids = protect(a.model, Path(tmp))
        rt = round_trip(out, ids, a.tokens, a.threads)
        n = max(2, len(rt["ids"]))
        te = tee(out, ids, n, a.threads)
    same = rt.pop("ids") == te.pop("ids")[:n]
    result = {"model": a.model, "prompt_tokens": len(ids), "machine": platform.platform(), "cpu_threads": a.threads,
              "command": " ".join(sys.argv), "round_trip": rt, "tee": te, "same_tokens": same,
              "tee_overhead": te["per_token_ms"] / rt["per_token_ms"] - 1}
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
