"""`stip bench --quick` (the CI smoke run) writes well-formed results. No figure is checked: CI machines are noisy."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _summary(s: dict) -> None:
    for key in ("median", "p25", "p75", "min", "max"):
        assert _number(s[key]), (key, s)
    assert s["min"] <= s["p25"] <= s["median"] <= s["p75"] <= s["max"]
    assert s["n"] >= 1


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    for module in ("crypten", "matplotlib"):  # the test extra installs both (scripts/install.sh --test)
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    out = tmp_path_factory.mktemp("bench")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "stip.cli", "bench", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, f"stip bench --quick failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return out, seconds, proc


def test_quick_bench_writes_every_file(quick_run):
    out, seconds, _ = quick_run
    for name in ("results.md", "results.json", "latency_breakdown.png", "server_throughput_ratio.png",
                 "server_throughput.png", "mpc_vs_plain.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC, png
    assert seconds < 240, f"the quick run took {seconds:.0f} s"


def test_quick_bench_json_sections(quick_run):
    out, _, _ = quick_run
    r = json.loads((out / "results.json").read_text())
    assert "errors" not in r
    assert r["meta"]["quick"] is True and "stip bench --quick" in r["meta"]["command"]
    m = r["machine"]
    assert m["cpu"] and _number(m["cores"]) and _number(m["torch_threads"]) and m["versions"]["torch"]
    assert sorted(r["plots"]) == sorted(p.name for p in out.glob("*.png"))

    sc = r["server_cost"]
    assert {row["phase"] for row in sc["rows"]} == {"prefill", "decode"}
    for row in sc["rows"]:
        for key in ("plain_tokens_per_s", "protected_tokens_per_s", "ratio", "ratio_copied"):
            _summary(row[key])
    assert _number(sc["ratio_min"]) and _number(sc["ratio_median"]) and _number(sc["max_abs_logit_diff"])

    e2e = r["end_to_end"]
    variants = {(row["variant"], row["network"]) for row in e2e["rows"]}
    assert ("plain", "in-process") in variants
    for net in ("loopback", "lan", "wifi"):
        assert {("stip-logits", net), ("stip-topk", net)} <= variants
        if net != "loopback":
            assert _number(e2e["networks"][net]["measured"]["rtt_ms"])
    for row in e2e["rows"]:
        _summary(row["per_token_ms"])
        if row["variant"] != "plain":
            for key in ("client_ms", "server_ms", "wire_ms", "ratio_to_plain"):
                _summary(row[key])
            assert row["bytes_up_per_token"] > 0 and row["bytes_down_per_token"] > 0
            assert row["same_tokens_as_plain"] is True
    by = {(row["variant"], row["network"]): row for row in e2e["rows"]}
    # the top-k downlink is k (index, value) pairs; full logits are V float32s
    assert by[("stip-topk", "loopback")]["bytes_down_per_token"] < 4096
    assert by[("stip-logits", "loopback")]["bytes_down_per_token"] > 49152 * 4

    p = r["protect"]
    assert _number(p["mb_per_s"]) and _number(p["peak_rss_gb"]) and p["checkpoint_bytes"] > 0
    mpc = r["mpc"]
    assert _number(mpc["speedup"]) and _number(mpc["mpc_seconds"]) and _number(mpc["plain_seconds"])


def test_quick_bench_markdown_tables(quick_run):
    out, _, _ = quick_run
    md = (out / "results.md").read_text()
    for heading in ("## Machine", "## Headline figures", "## 1. Server-side cost", "## 2. End to end",
                    "### Simulated networks", "## 3. Protect", "## 4. Secure two-party computation"):
        assert heading in md, heading
    assert "Command: `stip bench --quick" in md
    assert md.count("|---|") >= 7  # one separator row per table
    for png in out.glob("*.png"):
        assert f"]({png.name})" in md, png.name


def test_bench_needs_the_repository(monkeypatch, tmp_path):
    import stip.bench
    from stip.errors import StipError

    monkeypatch.setattr(stip.bench, "__file__", str(tmp_path / "stip" / "bench.py"))
    with pytest.raises(StipError, match="bench/ folder"):
        stip.bench.bench_root()
