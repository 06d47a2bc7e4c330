"""The load test (bench/load.py), short and on a tiny model: users join and leave a real `stip serve` at random,
some lose their socket mid-generation and one client process is SIGKILLed; every completed answer must match plain
greedy, /health must stay ok, and the server must end with no session and no KV memory held.

The 2-minute, 32-client SmolLM2 run is a benchmark, not a test: `python -m bench.load PROTECTED --clients 32
--duration 120` (docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys

from bench import load, load_probes


def test_judge_counts_near_ties_only_at_the_first_difference():
    assert load.judge([1, 2, 3], [1, 2, 3], [[1], [2], [3]]) == "exact"
    assert load.judge([1, 2, 3], [1, 5, 7], [[1], [5, 2], [7]]) == "near_tie"  # plain 2 in the client's top 5
    assert load.judge([1, 2, 3], [1, 5, 7], [[1], [5, 9], [7]]) == "wrong"
    assert load.judge([1, 2, 3], [1, 2], [[1], [2]]) == "wrong"  # stopped early with no difference: wrong


def test_load_tiny_model(tiny_protected, tmp_path):
    from stip.models import load_plain_model

    plain_dir, protected = tiny_protected("llama-gqa-untied")
    plain, _ = load_plain_model(plain_dir)
    r = load.run(protected, plain, clients=8, processes=2, duration=20.0, pool_size=12, prompt_range=(4, 40),
                 token_range=(4, 24), drop_rate=0.25, kill_every=8.0, session_ttl=2.0, max_idle=0.5, threads=1,
                 seed=1, log=lambda m: None)
    summary = json.dumps({k: v for k, v in r.items() if k != "worker_stderr"}, indent=1)
    assert r["completed"] >= 8, summary
    assert r["wrong"] == 0 and r["correct"] == r["completed"], summary
    assert r["errors"] == {}, summary
    assert r["disconnects"]["processes_killed"] >= 1, summary
    assert r["disconnects"]["socket_drop"] + r["disconnects"]["process_kill"] >= 1, summary
    assert r["health"]["failures"] == 0 and r["health"]["checks"] >= 15, summary
    assert r["health"]["ok_after"] and r["health"]["server_alive"], summary
    end = r["kv_at_end"]
    assert end["zero"], summary
    assert end["metrics"] == {g: 0 for g in load_probes.KV_GAUGES} and end["info"] == {"sessions": 0, "kv_tokens": 0}
    assert r["metrics_peak"].get("stip_sessions_active", 0) >= 2, summary  # users really overlapped
    assert end["sessions_closed"].get("expired", 0) >= 1, summary  # orphaned sessions were expired by the TTL
    assert r["throughput"]["tokens_per_s"] > 0 and r["latency_ms"]["per_token_p50"] is not None
    assert r["ok"], summary


def test_load_cli_refuses_a_folder_that_is_not_a_protected_output(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.load", str(tmp_path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert "not a `stip protect` output folder" in out.stderr and "Traceback" not in out.stderr

