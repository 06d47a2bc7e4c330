"""bench/gpu.py at its tiny size on CPU: the whole pipeline (build a random LLaMA, plain generate, our engine,
protect in both modes, real `stip serve` with `stip.Client` processes) in seconds; and its refusal without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch


def test_gpu_bench_tiny(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "bench.gpu", "--tiny", "--out", str(out), "--work", str(tmp_path / "w"),
                        "--batch", "1", "2", "--tokens", "6", "--prompt", "8"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((out / "gpu.json").read_text())
    assert doc == json.loads(p.stdout)
    got = {(r["mode"], r["engine"], r["batch"]): r for r in doc["rows"]}
    for mode, engine in [("plain", "HF generate"), ("plain", "ours (in process)"), ("round-trip", "ours"),
                         ("server-decode", "ours")]:
        for b in (1, 2):
            r = got[(mode, engine, b)]
            assert r["tokens_per_s"] > 0 and r["per_token_ms"] > 0, r
    for mode in ("round-trip", "server-decode"):
        for b in (1, 2):
            served = got[(mode, "ours", b)]
            assert served["tokens_per_client"] == [6]  # no EOS in the model: every client ran to --tokens
            assert served["same_as_plain"] is True  # fp32: every client's greedy tokens equal plain generate
    assert doc["command"].startswith("python -m bench.gpu --tiny")
    assert [s for s in doc["skipped"] if s["engine"] != "vLLM"] == []
    md = (out / "gpu.md").read_text()
    assert "| round-trip | ours |" in md and "| server-decode | ours |" in md
    assert not list(out.glob("*.tmp"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_bench_says_no_gpu(tmp_path):
    p = subprocess.run([sys.executable, "-m", "bench.gpu", "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2
    assert p.stderr.startswith("no GPU:") and "--tiny" in p.stderr and "Traceback" not in p.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_gpu_bench_time_budget_lists_what_it_skipped(tmp_path):
    p = subprocess.run([sys.executable, "-m", "bench.gpu", "--tiny", "--budget", "0", "--out", str(tmp_path),
                        "--work", str(tmp_path / "w"), "--tokens", "2", "--prompt", "4"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]  # nothing measured
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert doc["rows"] == []
    reasons = {(s["mode"], s["engine"]): s["reason"] for s in doc["skipped"]}
    assert reasons[("plain", "HF generate")] == "time budget of 0 s spent"
    assert reasons[("round-trip", "all")] == reasons[("server-decode", "all")] == "time budget of 0 s spent"
