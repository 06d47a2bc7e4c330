"""`python -m bench.decipher`'s results: the rekey budget read off the recovery curve, results.md and the plot."""

from __future__ import annotations

import math
from pathlib import Path

THRESHOLD = 0.05  # the recovery a key must not reach


def budget(points: list[dict], metric: str, threshold: float = THRESHOLD) -> dict:
    """The traffic (tokens) at which `metric` first reaches `threshold`, interpolated linearly in log(tokens)
    between the two measured points around it. `bound` says when it is only a bound: "below" (the smallest point
    already reaches it) or "above" (no point does)."""
    pts = [(p["tokens"], p[metric]) for p in points if p.get(metric) is not None]
    if not pts:
        return {"tokens": None, "bound": "no data"}
    if pts[0][1] >= threshold:
        return {"tokens": pts[0][0], "bound": "below"}
    for (n0, y0), (n1, y1) in zip(pts, pts[1:]):
        if y1 >= threshold:
            f = (threshold - y0) / (y1 - y0)
            return {"tokens": round(math.exp(math.log(n0) + f * (math.log(n1) - math.log(n0)))), "bound": None}
    return {"tokens": pts[-1][0], "bound": "above"}


def fmt_budget(b: dict) -> str:
    if b["tokens"] is None:
        return "n/a"
    n = f"{b['tokens']:,}"
    return {"below": f"< {n} (the smallest traffic measured already passes 5%)",
            "above": f"> {n} (never reached 5% here)"}.get(b["bound"], f"~{n} tokens")


def _load(res: dict) -> str:
    load = res.get("load_average") or {}
    return f"{load.get('start', 0):.1f} at the start, {load.get('end', 0):.1f} at the end (a shared machine)"


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(res: dict) -> str:
    lines = [f"# Deciphering per-token codes at production volume ({res['model']})", "",
             f"Command: `{res['command']}`; commit {res['commit']}"
             + (" (DIRTY: uncommitted changes to the files this bench runs - not for committing)" if res["dirty"]
                else "") + f"; {res['machine']['cpu']}, {res['machine']['cores']} cores, torch threads "
             f"{res['machine'].get('torch_threads')}, load average {_load(res)}; {res['seconds']:.0f} s.",
             "", _method(res), ""]
    for mode in res["modes"]:
        lines += _mode_section(mode)
    lines += ["## Rekey budget", "",
              f"The traffic one key may serve before the decipherer recovers {100 * THRESHOLD:g}% of the tokens "
              "(interpolated in log-traffic between the measured points):", "",
              "| mode | all tokens | rare tokens |", "|---|---|---|"]
    for mode in res["modes"]:
        if "budget" in mode:
            lines.append(f"| {mode['mode']} | {fmt_budget(mode['budget']['all'])} | "
                         f"{fmt_budget(mode['budget']['rare'])} |")
    if res.get("plot"):
        lines += ["", f"![recovery vs traffic]({res['plot']})"]
    return "\n".join(lines) + "\n"


def _method(res: dict) -> str:
    c = res["corpus"]
    w = res.get("windows") or {"count": 1, "up_to": 0}
    return (f"Traffic: the first N tokens of the users' text ({c['users_tokens']:,} tokens available; up to "
            f"{w['up_to']:,} tokens, the mean over {w['count']} disjoint stretches of it), cut into "
            f"requests of {res['request_tokens']} tokens; each request's rows computed offline with the real key by "
            "the client's own `ClientBundle.embed` (a fresh noise chain per request), turned into codes as a server "
            "would (row hashes; with noise, rows linked by distance). Attacker: unigram and bigram statistics of "
            f"{c['attacker_tokens']:,} tokens of disjoint public text ({c['name']}), the same tokenizer; the "
            "decipherer of `stip.audit.decipher` (frequency-rank seed, then rounds of one-to-one matching of codes "
            "to tokens by the stream's bigram log-likelihood, codes brought in by frequency). Rare tokens: "
            "occurrences of tokens outside the public text's 1,000 most frequent (names, numbers, rare words). "
            f"Sources: {', '.join(f'{k} {v}' for k, v in c['sources'].items())}.")


def _mode_section(mode: dict) -> list[str]:
    if mode.get("skipped"):
        return [f"## {mode['mode']}", "", f"Skipped: {mode['skipped']}", ""]
    link = mode["linking"]
    out = [f"## {mode['mode']}", "",
           f"Codes: {mode['codes_from']}. Over all {link['rows']:,} tokens: {link['codes']:,} codes for "
           f"{link['tokens']:,} distinct tokens, purity {pct(link['purity'])} (rows whose code's most common token "
           f"is their own). Embedding and coding took {mode['codes_seconds']:.0f} s.", "",
           "| traffic (tokens) | codes | recovered: all | rare | rare share | frequency rank only | seconds |",
           "|---|---|---|---|---|---|---|"]
    if mode.get("same_partition_as"):
        out[-3:-3] = [f"Its codes partition the traffic exactly as mode {mode['same_partition_as']}'s do (the same "
                      "positions share a code), and the decipherer sees nothing but that partition (codes are "
                      "ordered by count, ties by first appearance), so it deciphers both alike. Recomputed up to "
                      f"{max([p['tokens'] for p in mode['points'] if 'copied_from' not in p] or [0]):,} tokens: "
                      + ("equal to" if mode.get("check_equal") else "DIFFERENT from") +
                      f" mode {mode['same_partition_as']}'s; the rows marked * are taken from it.", ""]
    for p in mode["points"]:
        mark = " *" if p.get("copied_from") else ""
        out.append(f"| {p['tokens']:,}{mark} | {round(p['codes']):,} | {pct(p['all'])} | {pct(p['rare'])} | "
                   f"{pct(p['rare_share'])} | {pct(p['rank_only'])} | {p['seconds']:.1f} |")
    return out + [""]


def plot(res: dict, path: Path) -> str | None:
    """recovery vs traffic (log x), all and rare tokens per mode, the 5% line; the file name, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in res["modes"]:
        if mode.get("skipped"):
            continue
        xs = [p["tokens"] for p in mode["points"]]
        ax.plot(xs, [100 * p["all"] for p in mode["points"]], marker="o", label=f"{mode['mode']}: all tokens")
        ax.plot(xs, [100 * (p["rare"] or 0) for p in mode["points"]], marker="s", linestyle="--",
                label=f"{mode['mode']}: rare tokens")
        ax.plot(xs, [100 * p["rank_only"] for p in mode["points"]], linestyle=":", alpha=0.6,
                label=f"{mode['mode']}: frequency rank only")
    ax.axhline(100 * THRESHOLD, color="red", linewidth=0.8, label=f"{100 * THRESHOLD:g}%")
    ax.set_xscale("log")
    ax.set_xlabel("tokens served under one key")
    ax.set_ylabel("tokens recovered (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"Deciphering per-token codes, {res['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
