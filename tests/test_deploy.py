"""`python -m bench.deploy --quick` (issue 22's deployment table) writes well-formed results: the light client (a venv
with no torch) against a real `stip serve` of the session's protected SmolLM2, the laptop profile on the simulated
wired link. No figure is judged (CI machines are noisy); the run's shape, its limits and its labels are."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_quick_deploy_writes_the_table(smollm2_protected, tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.deploy", "--quick", "--bundle", str(smollm2_protected),
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    doc = json.loads((tmp_path / "deploy.json").read_text())
    md = (tmp_path / "deploy.md").read_text()
    assert md == done.stdout  # printed and written alike

    assert doc["quick"] is True and doc["command"].startswith("python -m bench.deploy --quick")
    assert len(doc["commit"]) == 40 and isinstance(doc["dirty"], bool) and doc["machine"]["cpu"]
    assert doc["client_imported_torch"] is False and "light venv" in doc["client_python"]
    assert doc["same_tokens_everywhere"] is True
    assert _positive(doc["client_install"]["total_mb"])
    assert doc["networks"]["wired"]["rtt_ms"] == 0.5 and _positive(doc["networks"]["wired"]["measured"]["rtt_ms"])

    rows = doc["rows"]
    assert [(r["device"], r["network"], r["downlink"]) for r in rows] == [("laptop", "wired", "topk"),
                                                                         ("laptop", "wired", "logits")]
    for r in rows:
        assert r["limits"]["cores"] == [0] and r["limits"]["address_space_gb"] == 4.0  # the profile really applied
        for key in ("per_token_ms", "client_ms", "network_ms", "server_ms", "ttft_ms", "bytes_up", "bytes_down",
                    "cold_start_ms", "rss_peak_mb", "offline_client_ms"):
            assert _positive(r[key]), (key, r[key])
        assert r["tokens"] == [6]
    topk, logits = rows
    assert logits["bytes_down"] > 4 * 49152 > topk["bytes_down"]  # all float32 logits against 64 pairs

    # issue 22's 7B-shaped budgets, on --quick's small table: the client's per-token code on a synthetic bundle
    t = doc["table"]
    assert (t["rows"], t["cols"], t["touch"], t["seven_b"]) == (4096, 512, 100, False)
    assert t["limits"]["cores"] == [0] and t["limits"]["address_space_gb"] == 4.0 and t["torch_imported"] is False
    assert t["touched_rows"] >= 100 and _positive(t["per_token"]["total_ms"]) and _positive(t["tokenizer_mb"])
    assert t["rss_budget_mb"] == pytest.approx(t["tokenizer_mb"] + t["touched_rows_mb"] + 50, abs=0.2)
    assert t["memory"]["after"]["VmRSS"] == t["rss_mb"] >= t["memory"]["bundle"]["VmRSS"]

    for text in ("simulated", "Beside the paper's three settings", "| wireless | 510 |", "NVIDIA Orin board",
                 "Issue 22's budgets", "--quick: a smoke run", "4096 x 512 float16 table (not 7B-shaped)",
                 "`ClientBundle.embed`", "tokenizer + touched rows + 50 MiB"):
        assert text in md, text
