"""The privacy frontier (issue 21): for every protection mode and knob setting audited, what it costs and what the
strongest attack still gets.

    python -m bench.frontier bench/results/audit/table.json bench/results/privacy-frontier/audit-aloepri/table.json

Reads `python -m bench.audit_table` outputs (table.json) and writes OUT/frontier.md, frontier.json and frontier.png.
Per mode (one row of a table) and attacker level:
- x, the accuracy cost: top-1 disagreement with the unprotected model and the perplexity change, both measured by
  audit_table through the real server and client;
- y, the highest share of prompt tokens any token-recovering attack got (unit "tokens": per-token codes, key
  entries, dCor and losses are not tokens), and which attack got it; attacks that do not apply are listed;
- the server's compute per token against plain, estimated from the shapes (every linear is proportional to the
  residual width, so AloePri's d + 2h costs (d + 2h) / d; the other modes keep plain's shapes): an estimate, not a
  timing.
AloePri's published points (other, far larger models; a benchmark's accuracy loss, not top-1 disagreement) are drawn
beside ours and labelled so. The goal of issue 21 is checked at level base: every attack <= 5% of tokens, <= 1% top-1
disagreement, serving within 1.1x of plain.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

OUT = Path("bench/results/privacy-frontier")
TOKENS = "tokens"
GOAL = {"level": "base", "recovery": 0.05, "disagreement": 0.01, "speed": 1.1}
# Attacks whose result is not a share of tokens (key entries, per-token codes, dCor, a loss): never in y, nor in n/a.
NOT_TOKENS = ("known_plaintext", "bundle_keys", "lm_head_matching", "distance_correlation", "finetune")
LEAKED_PAIRS = ("ridge_inversion",)  # attacks that are also given k of the traffic's tokens (a leak): shown apart too

# AloePri's published numbers (Lin et al., arXiv 2603.01499) and the public reproduction's, as the issue cites them.
# x: the accuracy loss they report (a benchmark's, in points), as a range where only a bound is given; None: not
# given. All at the attacker holding the served model's public weights (our level exact).
PUBLISHED = [
    {"label": "AloePri, Llama3-8B", "recovery": 0.026, "x": (5.6, 5.6),
     "note": "vocabulary matching 2.6%; C-Eval 50.2 -> 44.6 (5.6 points)", "source": "arXiv 2603.01499"},
    {"label": "AloePri, DeepSeek-V3.1", "recovery": 0.048, "x": (0.0, 3.5),
     "note": "4.8%; within the paper's stated 0-3.5% accuracy loss", "source": "arXiv 2603.01499"},
    {"label": "AloePri, Qwen3-14B", "recovery": 0.251, "x": (0.0, 3.5),
     "note": "25.1%; within the paper's stated 0-3.5% accuracy loss", "source": "arXiv 2603.01499"},
    {"label": "public reproduction", "recovery": 0.977, "x": None,
     "note": "vocabulary matching 97.7% at noise small enough to keep generation usable (loss not given)",
     "source": "public reproduction cited in issue 21"},
]


def _levels_of(report: dict) -> dict[str | None, dict[str, dict]]:
    """{level: {attack: result}}; a report from before levels has one level, None."""
    out: dict = {}
    for a in report.get("attacks", []):
        out.setdefault(a.get("level"), {})[a["name"]] = a
    return out


def level_summary(attacks: dict[str, dict]) -> dict:
    """The strongest token-recovering attack at one level, every token share, and the attacks that did not run."""
    shares = {n: float(a["recovery"]) for n, a in attacks.items() if n not in NOT_TOKENS
              and not a.get("skipped") and a.get("recovery") is not None and a.get("unit") == TOKENS}
    best = max(shares, key=shares.get) if shares else None
    no_leak = {n: s for n, s in shares.items() if n not in LEAKED_PAIRS}
    best_no_leak = max(no_leak, key=no_leak.get) if no_leak else None
    return {"max_recovery": shares[best] if best else None, "attack": best, "token_recovery": shares,
            "max_without_leak": no_leak[best_no_leak] if best_no_leak else None, "attack_without_leak": best_no_leak,
            "not_applicable": {n: a["skipped"] for n, a in attacks.items()
                               if a.get("skipped") and n not in NOT_TOKENS and not _unfinished(a)},
            "unfinished": {n: a["skipped"] or a["details"]["stopped"] for n, a in attacks.items()
                           if n not in NOT_TOKENS and _unfinished(a)}}


def _unfinished(attack: dict) -> bool:
    """Stopped at its budget (with or without a partial result) or failed: neither a result nor an n/a."""
    return bool((attack.get("skipped") or "").startswith(("stopped", "error"))
                or (attack.get("details") or {}).get("stopped"))


def compute_ratio(report: dict, plain_hidden: int | None) -> dict:
    """Server compute per token against plain: (d + 2h) / d under AloePri (every linear scales with the residual
    width; attention over the context does not), 1 for modes that keep plain's shapes."""
    knobs = report.get("aloepri")
    if knobs is None:
        return {"ratio": 1.0, "basis": "the same shapes as plain"}
    h = int(knobs.get("h", 0))
    if not plain_hidden:
        return {"ratio": None, "basis": f"h = {h}; the plain model's width is unknown here"}
    return {"ratio": (plain_hidden + 2 * h) / plain_hidden,
            "basis": f"(d + 2h) / d = ({plain_hidden} + 2 x {h}) / {plain_hidden}, an estimate from the shapes"}


def plain_hidden_size(model: str) -> int | None:
    """The plain model's hidden size d, from its config.json where the table's model can be found here."""
    try:
        from stip.models import resolve_model

        path = Path(resolve_model(str(Path(model).expanduser()) if str(model).startswith("~") else model))
        cfg = json.loads((path / "config.json").read_text())
    except Exception:  # noqa: BLE001 - not installed here: the ratio is then unknown, and says so
        return None
    return int(cfg.get("text_config", cfg).get("hidden_size") or 0) or None


def goal_check(point: dict) -> dict:
    """Issue 21's goal at level base: each part met (True/False) or unknown (None), and all of them."""
    lv = point["levels"].get(GOAL["level"])
    recovery = None if lv is None or lv["max_recovery"] is None else lv["max_recovery"] <= GOAL["recovery"]
    parts = {  # an attack that did not finish leaves a low y unproven
        "recovery": None if recovery and lv["unfinished"] else recovery,
        "disagreement": point["top1_disagreement"] <= GOAL["disagreement"],
        "speed": None if point["compute"]["ratio"] is None else point["compute"]["ratio"] <= GOAL["speed"],
    }
    met = False if False in parts.values() else (None if None in parts.values() else True)
    return {"met": met, **parts}


def points(table: dict, source: str) -> list[dict]:
    """One point per audited mode of one table (skipped modes left out, with why)."""
    d = plain_hidden_size(table.get("model", ""))
    out = []
    for row in table.get("rows", []):
        if row.get("skipped"):
            out.append({"mode": row["mode"], "source": source, "skipped": row["skipped"]})
            continue
        q, report = row["quality"], row["report"]
        by_level = _levels_of(report)
        levels = table.get("levels") or ["exact"]
        p = {"mode": row["mode"], "source": source, "model": table.get("model"), "base": table.get("base"),
             "commit": table.get("commit"), "dirty": table.get("dirty"), "quick": table.get("quick"),
             "top1_disagreement": 1.0 - q["top1_agreement"], "positions": q.get("positions"),
             "ppl_plain": q["ppl_plain"], "ppl_protected": q["ppl_protected"], "ppl_change": q["ppl_change"],
             "quality_path": q.get("path"), "aloepri": report.get("aloepri"),
             "traffic": report.get("traffic"), "budget_s": report.get("budget_s"),
             "levels": {lv: level_summary(by_level.get(lv) or by_level.get(None) or {}) for lv in levels},
             "compute": compute_ratio(report, d)}
        p["goal"] = goal_check(p)
        out.append(p)
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _yes(v: bool | None) -> str:
    return {True: "yes", False: "no", None: "unknown"}[v]


def markdown(result: dict) -> str:
    lines = ["# Privacy frontier: what each mode costs, and what the strongest attack still gets", "",
             f"Command: `{result['command']}`; {result['machine']['cpu']}, {result['machine']['cores']} cores; "
             f"{result['date']}.", "", "Inputs (each table's own command, commit and machine are in it):", ""]
    for i, t in enumerate(result["inputs"], 1):
        lines.append(f"- [{i}] `{t['path']}`: {t['model']} (base {t['base'] or '-'}), levels "
                     f"{', '.join(t['levels'])}, commit {t['commit'] or 'unknown'}"
                     f"{' **DIRTY TREE**' if t['dirty'] else ''}, {t['machine']}"
                     f"{', quick budgets' if t['quick'] else ''}; `{t['command']}`")
    lines += ["", "x: top-1 disagreement with the unprotected model and the perplexity change (held-out text, through "
              "the real server and client). y: the highest share of prompt tokens any token-recovering attack got "
              "at that attacker level (base: the public model the served one was fine-tuned from; exact: the "
              "served model's own weights), and which attack; beside it the highest among the attacks that are not "
              f"given any of the traffic's tokens ({', '.join(LEAKED_PAIRS)} is: k leaked (token, row) pairs). "
              "Compute: the server's per-token compute against plain, estimated from the shapes (not a timing).", "",
              "| mode | level | top-1 disagreement | perplexity | max token recovery | by | without leaked tokens | "
              "n/a | stopped or failed | compute vs plain |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += _mode_rows(result["points"])
    lines += ["", "n/a: attacks that report why they do not apply to the mode (each mode's report.md gives the "
              "reason; under AloePri the residual is d + 2h wide, with no square transform to solve for). Stopped or "
              "failed: attacks stopped at their time budget (a partial result, if any, counts in y) or that failed; "
              "y is then a floor.", ""]
    lines += _goal_section(result)
    lines += ["", "## Published (other models, not measured here)", "",
              "Drawn beside ours in the plot's exact panel: the attacker there holds the served model's public "
              "weights. Their x is a benchmark's accuracy loss in points, not top-1 disagreement.", "",
              "| scheme, model | token recovery | accuracy loss | note | source |", "|---|---|---|---|---|"]
    for p in PUBLISHED:
        x = "not given" if p["x"] is None else f"{p['x'][0]:g}" if p["x"][0] == p["x"][1] else \
            f"{p['x'][0]:g}-{p['x'][1]:g}"
        lines.append(f"| {p['label']} | {_pct(p['recovery'])} | {x} | {p['note']} | {p['source']} |")
    lines += ["", "![frontier](frontier.png)", ""]
    return "\n".join(lines)


def _mode_rows(pts: list[dict]) -> list[str]:
    """One table row per mode and level (the mode's own columns on its first level's row)."""
    lines = []
    for p in pts:
        if p.get("skipped"):
            lines.append(f"| {p['tag']}{p['mode']} | - | - | - | - | - | - | skipped: {p['skipped']} | - | - |")
            continue
        ratio = p["compute"]["ratio"]
        own = [f"{p['tag']}{p['mode']}", _pct(p["top1_disagreement"]),
               f"{p['ppl_plain']:.2f} -> {p['ppl_protected']:.2f} ({100 * p['ppl_change']:+.1f}%)",
               "-" if ratio is None else f"{ratio:.2f}x"]
        for i, (lv, s) in enumerate(p["levels"].items()):
            name, dis, ppl, comp = own if i == 0 else ("", "", "", "")
            no_leak = f"{_pct(s['max_without_leak'])} ({s['attack_without_leak'] or '-'})"
            lines.append(f"| {name} | {lv} | {dis} | {ppl} | {_pct(s['max_recovery'])} | {s['attack'] or '-'} | "
                         f"{no_leak} | {', '.join(sorted(s['not_applicable'])) or '-'} | "
                         f"{', '.join(sorted(s['unfinished'])) or '-'} | {comp} |")
    return lines


def _goal_section(result: dict) -> list[str]:
    lines = [f"## Issue 21's goal (level {GOAL['level']})", "",
             f"Every attack <= {100 * GOAL['recovery']:.0f}% of prompt tokens, <= {100 * GOAL['disagreement']:.0f}% "
             f"top-1 disagreement, serving within {GOAL['speed']}x of plain (the compute estimate stands for it).", "",
             "| mode | every attack <= 5% | top-1 disagreement <= 1% | compute <= 1.1x | goal met |",
             "|---|---|---|---|---|"]
    for p in result["points"]:
        if not p.get("skipped"):
            g = p["goal"]
            lines.append(f"| {p['tag']}{p['mode']} | {_yes(g['recovery'])} | {_yes(g['disagreement'])} | "
                         f"{_yes(g['speed'])} | **{_yes(g['met'])}** |")
    return lines + ["", result["verdict"]]


def verdict(pts: list[dict]) -> str:
    met = [p["tag"] + p["mode"] for p in pts if not p.get("skipped") and p["goal"]["met"]]
    if met:
        return f"**Goal met** by: {', '.join(met)}."
    scored = [p for p in pts if not p.get("skipped") and (p["levels"].get(GOAL["level"]) or {}).get("max_recovery")
              is not None]
    if not scored:
        return f"**Goal not checked**: no input has level {GOAL['level']}."
    best = min(scored, key=lambda p: (p["levels"][GOAL["level"]]["max_recovery"], p["top1_disagreement"]))
    lv = best["levels"][GOAL["level"]]
    return (f"**Goal not met** by any mode measured. Lowest token recovery at level {GOAL['level']}: "
            f"{best['tag']}{best['mode']}, "
            f"{_pct(lv['max_recovery'])} ({lv['attack']}) at {_pct(best['top1_disagreement'])} top-1 disagreement.")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for ax, level in zip(axes, ("base", "exact")):
        ax.add_patch(plt.Rectangle((0, 0), 100 * GOAL["disagreement"], 100 * GOAL["recovery"], color="tab:green",
                                   alpha=0.25, label="issue 21's goal" if level == "base" else None))
        xs = [(p, p["levels"][level]) for p in result["points"] if not p.get("skipped") and level in p["levels"]
              and p["levels"][level]["max_recovery"] is not None]
        labels: dict[tuple[float, float], list[str]] = {}  # points on top of each other share one label
        for p, s in xs:
            aloepri = p.get("aloepri") is not None
            x, y = 100 * p["top1_disagreement"], 100 * s["max_recovery"]
            color = "tab:red" if aloepri else "tab:blue"
            ax.scatter([x], [y], marker="s" if aloepri else "o", color=color, zorder=3)
            if s["max_without_leak"] is not None and s["max_without_leak"] != s["max_recovery"]:
                y2 = 100 * s["max_without_leak"]  # hollow: the strongest attack given none of the traffic's tokens
                ax.scatter([x], [y2], marker="s" if aloepri else "o", facecolors="none", edgecolors=color, zorder=3)
                ax.plot([x, x], [y2, y], color=color, lw=0.5, ls=":")
            labels.setdefault((round(x, 1), round(y, 1)), []).append(f"{p['tag']}{p['mode']} ({s['attack']})")
        for (x, y), names in labels.items():
            ax.annotate("\n".join(names), (x, y), fontsize=6, xytext=(-4 if x > 30 else 4, -8 - 7 * len(names)),
                        textcoords="offset points", ha="right" if x > 30 else "left")
        if level == "exact":
            for pub in PUBLISHED:
                y = 100 * pub["recovery"]
                if pub["x"] is None:
                    ax.scatter([0], [y], marker="v", color="grey", zorder=2)
                    ax.annotate(f"{pub['label']} (published; loss not given)", (0, y), fontsize=6, color="grey",
                                xytext=(60, -150), textcoords="offset points",
                                arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5})
                    continue
                lo, hi = pub["x"]
                ax.errorbar([(lo + hi) / 2], [y], xerr=[[(hi - lo) / 2]], fmt="D", color="grey", capsize=3, zorder=2)
                ax.annotate(f"{pub['label']} (published; x = benchmark loss, points)", ((lo + hi) / 2, y),
                            fontsize=6, color="grey", xytext=(4, 4), textcoords="offset points")
        if not xs:
            ax.text(10, 50, f"no level {level} in the inputs", ha="center", color="grey")
        ax.set_title(f"attacker level {level}")
        ax.set_xlabel("top-1 disagreement with the unprotected model (%; linear to 1, log above)")
        ax.set_xscale("symlog", linthresh=1.0, linscale=0.6)
        ax.set_xlim(-0.1, 110)
        ax.set_ylim(-2, 104)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("highest token recovery over the attacks (%)")
    axes[0].legend(loc="center right", fontsize=8)
    fig.suptitle("Privacy frontier (blue: STIP modes, red squares: AloePri settings, grey: published, other models; "
                 "hollow: the strongest attack given none of the traffic's tokens)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def build(paths: list[Path], command: str) -> dict:
    from bench.report import machine_info

    inputs, pts = [], []
    for i, path in enumerate(paths, 1):
        table = json.loads(Path(path).read_text())
        m = table.get("machine") or {}
        inputs.append({"path": str(path), "model": table.get("model"), "base": table.get("base"),
                       "levels": table.get("levels") or ["exact"], "commit": table.get("commit"),
                       "dirty": bool(table.get("dirty")), "quick": bool(table.get("quick")),
                       "command": table.get("command"), "seconds": table.get("seconds"),
                       "machine": f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores"})
        pts += [{**p, "tag": f"[{i}] " if len(paths) > 1 else ""} for p in points(table, str(path))]
    return {"command": command, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine_info(), "goal": GOAL, "inputs": inputs, "points": pts, "published": PUBLISHED,
            "verdict": verdict(pts)}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m bench.frontier", description=__doc__.splitlines()[0])
    ap.add_argument("tables", nargs="+", type=Path, help="table.json files written by python -m bench.audit_table")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    missing = [str(p) for p in a.tables if not p.is_file()]
    if missing:
        raise SystemExit(f"error: no such table: {', '.join(missing)} (write one with python -m bench.audit_table)")
    result = build(a.tables, shlex.join(["python", "-m", "bench.frontier", *argv]))
    from stip.common.files import write_bytes_atomic

    a.out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(a.out / "frontier.json", (json.dumps(result, indent=2, default=str) + "\n").encode())
    write_bytes_atomic(a.out / "frontier.md", markdown(result).encode())
    plot(result, a.out / "frontier.png")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
