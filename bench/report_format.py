"""Cell formatting shared by results.md and the plots: numbers, medians with their spread, byte counts, Markdown
tables, and the plots' file names."""

from __future__ import annotations

PLOTS = {
    "latency": "latency_breakdown.png",
    "ratio": "server_throughput_ratio.png",
    "throughput": "server_throughput.png",
    "mpc": "mpc_vs_plain.png",
    "concurrent": "concurrent_users.png",
}


def num(x, nd=2) -> str:
    """A cell: "-" for none, yes/NO for a flag, thousands separated, `nd` decimals below 100."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, int):
        return f"{x:,}"
    if x != x:
        return "nan"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.1f}" if nd else f"{x:.0f}"
    return f"{x:.{nd}f}"


def mid(s: dict, nd=2) -> str:
    """median [p25-p75]"""
    return f"{num(s['median'], nd)} [{num(s['p25'], nd)}-{num(s['p75'], nd)}]"


def span(s: dict, nd=3) -> str:
    """min-max"""
    return f"{num(s['min'], nd)}-{num(s['max'], nd)}"


def nbytes(n) -> str:
    """A byte count in B, KB or MB (decimal units)."""
    if n is None:
        return "-"
    n = float(n)
    for unit, size in (("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def row_label(r: dict) -> str:
    """A server-cost row's config: phase, batch and tokens or context."""
    if r["phase"] == "prefill":
        return f"prefill B={r['batch']} T={r['tokens']}"
    return f"decode B={r['batch']} (ctx {r['context']})"
