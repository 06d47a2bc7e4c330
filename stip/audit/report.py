"""The audit report: report.json (everything), report.md (a summary table, then each attack's details) and one PNG
per curve an attack returned, linked from the Markdown. Every file is written atomically."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

from stip.common.files import write_bytes_atomic

# Units whose `recovery` is a share (shown as a percentage); others are shown as numbers.
SHARE_UNITS = ("tokens", "tokens (codes)", "key entries", "key columns", "keys", "entries")


def _jsonable(value):
    """Tensors and numpy values an attack left in its details, as plain numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def fmt_recovery(attack: dict) -> str:
    r = attack.get("recovery")
    if r is None:
        return "-"
    unit = str(attack.get("unit", ""))
    return f"{100 * r:.1f}%" if unit in SHARE_UNITS or unit.startswith("key") else f"{r:.3f}"


def status(attack: dict) -> str:
    skipped = attack.get("skipped")
    if skipped:
        if skipped.startswith("error") or skipped.startswith("stopped"):
            return skipped
        return f"skipped: {skipped}"
    notes = []
    details = attack.get("details") or {}
    if details.get("same_as_level"):
        return f"as at level {details['same_as_level']} (it reads no weights)"
    if details.get("stopped"):
        notes.append(f"{details['stopped']}: partial result")
    if details.get("over_budget"):
        notes.append(f"over budget ({details['over_budget']})")
    return "; ".join(notes)


def levels_of(report: dict) -> list[str]:
    """The knowledge levels the report holds, in order (reports from before levels: one, unnamed)."""
    return list(report.get("levels") or dict.fromkeys(a.get("level") for a in report.get("attacks", [])))


def by_attack(report: dict) -> dict[str, dict[str | None, dict]]:
    """{attack name: {level: its result}}, in the report's order."""
    out: dict[str, dict[str | None, dict]] = {}
    for a in report.get("attacks", []):
        out.setdefault(a["name"], {})[a.get("level")] = a
    return out


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "curve"


def plot_curves(out: Path, attack: dict, suffix: str = "") -> list[tuple[str, str]]:
    """One PNG per curve of the attack: [(curve name, file name)]. Without matplotlib: none."""
    curves = attack.get("curves") or {}
    if not curves:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    files = []
    for name, curve in curves.items():
        x, y = curve.get("x"), curve.get("y")
        series = y if isinstance(y, dict) else {None: y}
        if not isinstance(x, list) or not all(isinstance(v, list) and len(v) == len(x) for v in series.values()):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
        for label, values in series.items():
            ax.plot(x, values, marker="o" if len(x) <= 32 else None, markersize=3, label=label)
        ax.set_xlabel(str(curve.get("xlabel", "")))
        ax.set_ylabel(str(curve.get("ylabel", "")))
        ax.set_title(name if len(name) <= 70 else name[:67] + "...", fontsize=9)
        ax.grid(alpha=0.3)
        if any(label is not None for label in series):
            ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        file = f"{slug(attack['name'])}{suffix}-{slug(name)}.png"
        write_bytes_atomic(out / file, buf.getvalue())
        files.append((name, file))
    return files


def _detail_lines(details: dict[str, Any], limit: int = 1500) -> list[str]:
    lines = []
    for key, value in details.items():
        if isinstance(value, (int, float, str, bool)) or value is None:
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            if "\n" in text:
                lines.append(f"- {key}:\n\n```\n{text.strip()}\n```")
                continue
        else:
            text = json.dumps(value, default=str)
            if len(text) > limit:
                text = text[:limit] + " ..."
            text = f"`{text}`"
        lines.append(f"- {key}: {text}")
    return lines


def _attacker_lines(report: dict) -> list[str]:
    attacker = report.get("attacker")
    if not attacker:
        return [f"- reference weights (attacker's): {report.get('reference') or 'none'}"]
    held = "; ".join(f"**{level}**: {weights or 'no weights'}" for level, weights in attacker["weights"].items())
    return [f"- attacker levels (what it holds besides the bundle, the traffic and public text): {held}; "
            f"public LM: {attacker.get('public_lm') or 'none'}"]


def _table(report: dict) -> list[str]:
    """The summary table: one recovery column, or one per level."""
    levels = levels_of(report)
    rows = by_attack(report)
    if len(levels) <= 1:
        lines = ["| attack | recovery | unit | seconds | notes |", "|---|---|---|---|---|"]
        for per_level in rows.values():
            a = next(iter(per_level.values()))
            lines.append(f"| {a.get('title') or a['name']} (`{a['name']}`) | {fmt_recovery(a)} | {a.get('unit', '')}"
                         f" | {a.get('seconds', 0):.1f} | {status(a).replace('|', '/')} |")
        return lines
    lines = ["| attack | " + " | ".join(f"level {lv}" for lv in levels) + " | unit | seconds | notes |",
             "|---" * (len(levels) + 4) + "|"]
    for per_level in rows.values():
        first = next(iter(per_level.values()))
        cells = [fmt_recovery(per_level[lv]) if lv in per_level else "-" for lv in levels]
        notes = "; ".join(f"{lv}: {status(a)}" for lv, a in per_level.items() if status(a))
        seconds = sum(a.get("seconds", 0) for a in per_level.values())
        lines.append(f"| {first.get('title') or first['name']} (`{first['name']}`) | " + " | ".join(cells)
                     + f" | {first.get('unit', '')} | {seconds:.1f} | {notes.replace('|', '/')} |")
    return lines


def markdown(report: dict, plots: dict[tuple[str, str | None], list[tuple[str, str]]]) -> str:
    commit = report.get("commit") or {}
    machine = report.get("machine") or {}
    traffic = report.get("traffic") or {}
    several = len(levels_of(report)) > 1
    head = [
        f"# STIP audit: {report.get('model', '?')}, mode {report.get('mode', '?')}",
        "",
        f"- mode: **{report.get('mode')}** (harden: {', '.join(report.get('harden') or []) or 'none'}; "
        f"noise: {report.get('noise', 0):g})",
        *_attacker_lines(report),
        f"- traffic: {traffic.get('prompts')} prompts of {traffic.get('prompt_tokens')} tokens, "
        f"{traffic.get('decode_steps')} decode step(s) each: {traffic.get('observations')} requests, "
        f"{traffic.get('rows')} rows; hidden states after layers {traffic.get('capture_layers')}",
        f"- commit: {commit.get('commit') or 'unknown'}{' (DIRTY TREE)' if commit.get('dirty') else ''}",
        f"- machine: {machine.get('cpu')}, {machine.get('cores')} cores, torch {machine.get('torch')}",
        f"- date: {report.get('date')}; {report.get('seconds')} s in all"
        + (" (quick settings: small budgets)" if report.get("quick") else "")
        + (f"; each attack stopped at {report['budget_s']:.0f} s" if report.get("budget_s") else ""),
        "",
        *_table(report),
    ]
    body = ["", "Recovery is the share of what the attack targets (tokens sent, or key entries) that it got right, "
            "scored against the auditor's truth; `-` where the attack reports no single share or did not run.", ""]
    for a in report.get("attacks", []):
        level = a.get("level")
        body += [f"## {a.get('title') or a['name']} (`{a['name']}`)" + (f", level {level}" if several else ""), ""]
        if (a.get("details") or {}).get("same_as_level"):
            body += [status(a), ""]
            continue
        if a.get("skipped"):
            body.append(f"{status(a)}")
            body.append("")
        body += _detail_lines({k: v for k, v in (a.get("details") or {}).items()})
        for name, file in plots.get((a["name"], level), []):
            body += ["", f"![{name}]({file})"]
        body.append("")
    return "\n".join(head + body) + "\n"


def write_report(out: str | Path, report: dict) -> dict[tuple[str, str | None], list[tuple[str, str]]]:
    """Write report.json, report.md and the plots into `out` (created if missing). Returns the plots per
    (attack, level)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    several = len(levels_of(report)) > 1
    plots = {(a["name"], a.get("level")): [] if (a.get("details") or {}).get("same_as_level") else
             plot_curves(out, a, f"-{slug(str(a.get('level')))}" if several else "")
             for a in report.get("attacks", [])}
    write_bytes_atomic(out / "report.json", (json.dumps(report, indent=2, default=_jsonable) + "\n").encode())
    write_bytes_atomic(out / "report.md", markdown(report, plots).encode())
    return plots
