"""`stip audit` attacker levels, budgets and the fine-tune behind level base (issue 20, parts 1 and 5).

- the budget stops an attack (SIGALRM), keeping its partial result, even one that catches Exception, and an
  outer timer survives it;
- levels: what each asks for, and the CLI's refusals;
- a tiny random LLaMA fine-tuned a few steps with bench.finetune, protected, then audited at levels none, base and
  exact on one capture: through the table command (its rows per mode and level, top-1 against the fine-tune's own
  weights) and through `stip audit` (one column per level; slow fake attacks stopped at --budget).
"""

from __future__ import annotations

import json
import signal
import sys
import time
import types

import pytest
import torch

from stip.audit.attacks.base import AttackResult
from tests.models import build_tiny, save_tiny

NAME = "llama-gqa-untied"  # 3 layers, d = 48, vocab 97, no tokenizer


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread; on a loaded machine its barriers cost much more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _slow_partial(ctx):
    """Works forever, leaving what it has so far in ctx.partial; swallows every Exception on the way."""
    done = 0
    while True:
        try:
            done += 1
            ctx.partial = AttackResult("slow", "A slow attack", min(done / 1000, 1.0), details={"steps": done})
            time.sleep(0.01)
        except Exception:  # noqa: BLE001 - the budget must get through this
            pass


def _slow_level(ctx):
    """Reads the level (so it runs at every level) and leaves nothing behind."""
    assert ctx.level in ("none", "base", "exact")
    while True:
        time.sleep(0.01)


def _slow_catching(ctx):
    """Catches the budget's exception itself and returns what it has."""
    from stip.audit.budget import BudgetExceeded

    try:
        while True:
            time.sleep(0.01)
    except BudgetExceeded:
        return AttackResult("catching", "Catches the budget", 0.25)


FAKES = {"slow": ("A slow attack", _slow_partial), "slow_level": ("Slow at every level", _slow_level),
         "catching": ("Catches the budget", _slow_catching)}


@pytest.fixture
def fakes(monkeypatch):
    """The fake attacks registered beside the real ones, as tests/test_audit.py registers its broken one."""
    from stip.audit import attacks as registry
    from stip.audit import run as audit_run

    names = registry.ATTACKS + tuple(FAKES)
    monkeypatch.setattr(registry, "ATTACKS", names)
    monkeypatch.setattr(audit_run, "ATTACKS", names)
    for name, (title, fn) in FAKES.items():
        monkeypatch.setitem(sys.modules, f"stip.audit.attacks.{name}", types.SimpleNamespace(NAME=name, TITLE=title,
                                                                                             run=fn))
    return names


def _bare_context(tmp_path):
    from stip.audit.context import AuditContext, Truth

    return AuditContext(server_dir=tmp_path, observations=[], truth=Truth([], tmp_path), tokenizer=None)


def test_budget_stops_the_attack(fakes, tmp_path):
    from stip.audit.runner import run_attack

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    signal.setitimer(signal.ITIMER_REAL, 30.0)  # an outer timer (pytest-timeout's, say) must survive the budget
    try:
        t0 = time.perf_counter()
        partial = run_attack("slow", _bare_context(tmp_path), 0.3)
        nothing = run_attack("slow_level", _bare_context(tmp_path), 0.3)
        caught = run_attack("catching", _bare_context(tmp_path), 0.3)
        elapsed = time.perf_counter() - t0
        left, _ = signal.getitimer(signal.ITIMER_REAL)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert elapsed < 10, elapsed
    assert partial.details["stopped"] == "stopped at the budget (0 s)" and partial.details["steps"] > 1
    assert partial.recovery == pytest.approx(partial.details["steps"] / 1000) and partial.skipped is None
    assert nothing.recovery is None and nothing.skipped == "stopped at the budget (0 s)"
    assert caught.recovery == 0.25 and caught.details["stopped"].startswith("stopped at the budget")
    assert 30 - elapsed - 1 < left <= 30 - elapsed + 0.1 and not fired


def test_levels_resolution():
    from stip.audit.levels import attacker_weights, parse_levels
    from stip.errors import StipError

    assert parse_levels(None) == ["none"] and parse_levels(None, reference="smollm2") == ["exact"]
    assert parse_levels("exact, none,base") == ["none", "base", "exact"]
    assert attacker_weights(["exact"], reference="m") == {"exact": "m"}  # today's --reference
    assert attacker_weights(["base"], reference="b") == {"base": "b"}
    assert attacker_weights(["none", "base", "exact"], "b", "e") == {"none": None, "base": "b", "exact": "e"}
    for args, message in [((["none", "nope"],), "unknown attacker level"),
                          ((["base"],), "level base needs --reference"),
                          ((["base", "exact"], "b"), "level exact needs --exact"),
                          ((["base"], "b", "e"), "add exact to --attacker"),
                          ((["none"], "b"), "level none holds none")]:
        with pytest.raises(StipError, match=message):
            (parse_levels if message.startswith("unknown") else attacker_weights)(*args)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """(base folder, fine-tune folder, protected fine-tune): bench.finetune's function on a tiny random LLaMA."""
    import stip
    from bench.finetune import finetune

    root = tmp_path_factory.mktemp("levels")
    base = save_tiny(NAME, root / "base")
    torch.set_num_threads(1)
    result = finetune(build_tiny(NAME), root / "ft", steps=4, seq=16, batch=2, lr=3e-3, eval_tokens=128,
                      public_tokens=2000, log_every=0)
    assert result["loss_after"] < result["loss_before"] and result["weight_drift"] > 1e-3, result
    stip.protect(root / "ft", root / "protected", progress=False)
    return base, root / "ft", root / "protected"


def test_table_at_three_levels(finetuned, tmp_path):
    """bench.audit_table --levels: one row per mode and level; vocab matching needs weights, so it is n/a at
    level none; top-1 agreement is measured against the fine-tune's own weights (lossless)."""
    from bench import audit_table

    base, ft, _ = finetuned
    table = audit_table.main(["--model", str(ft), "--base", str(base), "--levels", "none,base,exact", "--modes",
                              "paper", "--quick", "--attacks", "vocab_matching,known_plaintext", "--prompts", "3",
                              "--prompt-tokens", "12", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "paper" / "report.json").read_text())
    assert report["levels"] == ["none", "base", "exact"]
    got = {(a["name"], a["level"]): a for a in report["attacks"]}
    assert got["vocab_matching", "none"]["skipped"]
    assert got["vocab_matching", "exact"]["recovery"] >= 0.95
    assert got["vocab_matching", "base"]["recovery"] is not None
    assert got["known_plaintext", "base"]["details"]["same_as_level"] == "none"  # reads no weights: run once
    assert table["rows"][0]["quality"]["top1_agreement"] == 1.0
    text = (tmp_path / "table.md").read_text()
    assert "| mode | attacker | vocab matching | known plaintext |" in text
    assert "| paper | none | n/a |" in text and "| paper | exact | 100.0% |" in text


def test_cli_levels_and_budget(finetuned, fakes, tmp_path, monkeypatch, capsys):
    """`stip audit --attacker none,base,exact`: one capture, a column per level; the budget stops slow attacks."""
    from stip.cli import main

    base, ft, protected = finetuned
    out = tmp_path / "report"
    monkeypatch.setattr(sys, "argv", ["stip", "audit", str(protected), "--out", str(out), "--attacker",
                                      "none,base,exact", "--reference", str(base), "--exact", str(ft), "--quick",
                                      "--attacks", "known_plaintext,slow,slow_level", "--budget", "1",
                                      "--prompts", "2", "--prompt-tokens", "8"])
    main()
    printed = capsys.readouterr().out
    assert "attacker level none, base, exact" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["attacker"]["weights"] == {"none": None, "base": str(base), "exact": str(ft)}
    got = {(a["name"], a["level"]): a for a in report["attacks"]}
    assert got["slow", "none"]["details"]["stopped"] == "stopped at the budget (1 s)"
    assert got["slow", "exact"]["details"]["same_as_level"] == "none"
    assert all(got["slow_level", lv]["skipped"] == "stopped at the budget (1 s)" for lv in ("none", "base", "exact"))
    md = (out / "report.md").read_text()
    assert "| attack | level none | level base | level exact | unit | seconds | notes |" in md
    assert "stopped at the budget (1 s): partial result" in md and "## A slow attack (`slow`), level none" in md
