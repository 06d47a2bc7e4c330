"""bench/tee_latency.py on a tiny LLaMA: one real run (stip serve, stip serve --tee-worker and stip enclave as
processes), checked for what the benchmark claims: the same tokens in every variant, ABBA-interleaved repeats, a
breakdown that adds up and counts the enclave-worker messages the split implies."""

from __future__ import annotations

import json

import pytest

from bench import tee_latency


@pytest.fixture(scope="module")
def result():
    return tee_latency.run(tee_latency.TINY, tokens=4, repeats=2, threads=1, log=lambda m: None, clients=(3,))


def test_variants_agree_and_are_interleaved(result):
    assert result["same_tokens"] and result["decode_steps"] == 3
    assert set(result["runs"]) == {"round_trip", "tee", "tee_in_process"}
    assert all(len(runs) == 2 for runs in result["runs"].values())
    for v, s in result["summary"].items():
        t = s["per_token_ms"]
        assert 0 < t["min"] <= t["median"] <= t["max"], v
    assert result["ratio_vs_round_trip"]["tee"] > 0
    tee = result["summary"]["tee"]
    assert 0 < tee["attest_ms"]["median"] and tee["enclave_ms"]["median"] > 0  # the enclave reported its split
    assert 0 <= tee["pad_hit_rate"]["median"] <= 1  # and its pad pool's hits and misses
    assert result["git"]["commit"] and result["threads"] == 1 and "bench.tee_latency" in result["command"]
    assert len(result["machine"]["load_average_start"]) == 3
    lossless = result["lossless"]  # the enclave's logits against the plain model's at every timed step
    assert lossless["greedy_equal"] and lossless["steps"] == 4 and lossless["max_abs_logit_diff"] < 1e-4


def test_breakdown_adds_up_and_counts_messages(result):
    for run in result["runs"]["tee_in_process"]:
        parts = (run["enclave_ms_per_token"] + run["worker_ms_per_token"] + run["channel_ms_per_token"]
                 + run["unaccounted_ms_per_token"])
        assert parts == pytest.approx(run["per_token_ms"], rel=1e-6)
        assert run["worker_ms_per_token"] > 0 and run["channel_ms_per_token"] > 0
        assert 0 < run["enclave_pad_ms_per_token"]
        assert 0 <= run["pad_hit_rate"] <= 1  # pads from the enclave's pool (issue 23): the rest were made inline
        # LLaMA block 0: q/k/v in one request, o, gate/up in one, down; the LM head; the body: 6 per token
        assert run["messages_per_token"] == 6 and run["linear_messages_per_token"] == 5
        hidden, vocab = 48, 97  # tests/models.py's tiny LLaMA
        assert run["bytes_down_per_token"] >= vocab * 8 + hidden * 4  # float64 logits (padded), float32 body state


def test_concurrent_clients_tee_against_round_trip(result):
    """Issue 23 (5): three clients at once in each mode, interleaved rounds; the same tokens everywhere; the enclave
    batched their steps (more than one session per batched step on average)."""
    c = result["concurrent"]["3"]
    assert c["same_tokens"] and c["clients"] == 3 and len(c["runs"]["tee"]) == 2
    for mode in ("round_trip", "tee"):
        assert c["summary"][mode]["tokens_per_s"] > 0 and c["summary"][mode]["per_token_ms"] > 0
    assert c["summary"]["tee"]["mean_batch"] > 1 and c["ratio_per_token"] > 0
    assert 0 <= c["summary"]["tee"]["pad_hit_rate"] <= 1 and c["summary"]["round_trip"]["pad_hit_rate"] is None
    assert 0 <= c["warm_up_pad_hit_rate"] <= 1  # the first burst, pools at their start size (not counted)


def test_writes_json_and_markdown(result, tmp_path):
    paths = tee_latency.write(result, tmp_path / "tee")
    assert [p.name for p in paths] == [f"latency-{tee_latency.TINY}.json", f"latency-{tee_latency.TINY}.md"]
    assert json.loads(paths[0].read_text())["same_tokens"] is True
    md = paths[1].read_text()
    assert "| TEE (TeeClient -> stip enclave -> worker) |" in md and "2.6%" in md and "| 3 | tee |" in md
    assert "greedy equal to plain: True; max-abs logit difference" in md and "pad rows from the pool" in md
    assert not list((tmp_path / "tee").glob("*.tmp"))


def test_bad_arguments_named(capsys):
    with pytest.raises(SystemExit) as e:
        tee_latency.main(["--tokens", "1"])
    assert e.value.code == 2 and "--tokens must be at least 2" in capsys.readouterr().err


def test_precision_float64_is_lossless_float32_is_not(tmp_path):
    """bench/tee_precision.py --quick (issue 23, step 3): the enclave's float64 padded products stay at the plain
    model's own rounding and greedy-equal; float32 with the same hiding pad (2^20 B) is far off; a 16-bit field pad
    (quantized operands) is lossy too. Writes its JSON and table."""
    from bench import tee_precision

    r = tee_precision.main(["--quick", "--out", str(tmp_path)])
    rows = {v["variant"]: v for v in r["variants"]}
    ours = rows["float64, pad 2^20 B (the enclave's)"]
    assert ours["greedy_equal"] and ours["max_abs_logit_diff"] < 1e-4
    assert rows["float32, pad 2^20 B"]["max_abs_logit_diff"] > 1e-2
    assert rows["field, 16-bit fixed point"]["max_abs_logit_diff"] > 10 * ours["max_abs_logit_diff"]
    assert (tmp_path / "precision-tiny.json").is_file() and "| float32, pad 2^20 B |" in \
        (tmp_path / "precision-tiny.md").read_text()



def test_cost_model_adds_up():
    """bench/tee_cost_model.py (issue 23, step 6): the modelled TEE time per token is the round trip's plus the
    enclave's path, the messages and the float64 copies' extra reads, each as stated in the table."""
    import argparse

    from bench import tee_cost_model

    a = argparse.Namespace(t_rt=[10.0], gpu_tbps=2.5, message_ms=0.15)
    md = tee_cost_model.model(a, {(128, "static"): 1.0}, gflops=10.0)
    extra_gpu = sum(i * o for _, i, o in tee_cost_model.GROUPS) * 6 / 2.5e12 * 1e3
    total = 10.0 + 1.0 + 6 * 0.15 + extra_gpu
    assert "a cost model (not a measurement)" in md and f"| {total:.2f} | +{100 * (total - 10) / 10:.1f}% |" in md
