"""The PNG plots beside results.md, one function per plot; matplotlib is imported only when they are drawn (it is an
optional package: without it `bench.report.write` skips the plots with a note)."""

from __future__ import annotations

from pathlib import Path

from bench.report_format import PLOTS, row_label


def grouped_bars(ax, rows: list[dict], series: list[tuple[str, str, str]]) -> None:
    """One group of bars per row, one bar per (key, label, colour) series: the median, with the IQR as error bar."""
    w = 0.8 / len(series)
    for j, (key, name, color) in enumerate(series):
        med = [r[key]["median"] for r in rows]
        err = [[m - r[key]["p25"] for m, r in zip(med, rows)], [r[key]["p75"] - m for m, r in zip(med, rows)]]
        ax.bar([i + (j - (len(series) - 1) / 2) * w for i in range(len(rows))], med, w, yerr=err, capsize=3,
               color=color, label=name)


def _save(plt, fig, out: Path, key: str) -> str:
    """Write the figure as PLOTS[key] in `out` and close it; its file name."""
    fig.tight_layout()
    fig.savefig(out / PLOTS[key], dpi=120)
    plt.close(fig)
    return PLOTS[key]


def _latency_plot(plt, e2e: dict, out: Path, title_tail: str) -> list[str]:
    """Per-token latency per end-to-end variant, stacked into client, server and wire."""
    rows = e2e["rows"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.5))
    labels, xs = [], range(len(rows))
    colors = {"client": "#4c72b0", "server": "#dd8452", "wire": "#55a868", "plain": "#8c8c8c"}
    for x, r in zip(xs, rows):
        labels.append("plain\ngenerate" if r["variant"] == "plain" else
                      f"{r['downlink']}\n{r['network']}")
        if r["variant"] == "plain":
            ax.bar(x, r["per_token_ms"]["median"], color=colors["plain"],
                   label="plain model (all compute)" if x == 0 else None)
        else:
            bottom = 0.0
            for part in ("client", "server", "wire"):
                v = max(0.0, r[f"{part}_ms"]["median"])
                ax.bar(x, v, bottom=bottom, color=colors[part],
                       label=f"{part}" if r is rows[1] else None)
                bottom += v
        s = r["per_token_ms"]
        ax.errorbar(x, s["median"], yerr=[[s["median"] - s["p25"]], [s["p75"] - s["median"]]], fmt="o",
                    color="black", ms=3, capsize=3, label="total: median, IQR" if x == 0 else None)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("ms per generated token")
    ax.set_title("Per-token latency and where it goes" + title_tail)
    ax.legend(fontsize=8)
    return [_save(plt, fig, out, "latency")]


def _server_cost_plots(plt, sc: dict, out: Path, title_tail: str) -> list[str]:
    """The protected / plain throughput ratio per config, then both throughputs per phase."""
    rows = sc["rows"]
    labels = [row_label(r).replace(" (", "\n(").replace(" T=", "\nT=") for r in rows]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(rows) + 2), 4.5))
    series = [("ratio", "all repeats of all processes", "#4c72b0"),
              ("ratio_per_process", "per-process medians", "#55a868")]
    grouped_bars(ax, rows, series)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(0.98, color="#c44e52", ls="--", lw=1, label="target 0.98")
    lo = min([0.9] + [r[k]["p25"] for r in rows for k, _, _ in series])
    hi = max([1.05] + [r[k]["p75"] for r in rows for k, _, _ in series])
    ax.set_ylim(lo - 0.02, hi + 0.02)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("protected / plain throughput")
    ax.set_title("Engine level, in-process batched forward: protected vs plain (median, IQR)" + title_tail)
    ax.legend(fontsize=8)
    written = [_save(plt, fig, out, "ratio")]

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, phase in zip(axes, ("prefill", "decode")):
        sub = [r for r in rows if r["phase"] == phase]
        grouped_bars(ax, sub, [("plain_tokens_per_s", "plain (token ids)", "#8c8c8c"),
                               ("protected_tokens_per_s", "protected (embeddings)", "#4c72b0")])
        ax.set_xticks(range(len(sub)), [row_label(r).split(" ", 1)[1] for r in sub], fontsize=8)
        ax.set_title(f"{phase} tokens/s")
        ax.legend(fontsize=8)
    fig.suptitle("Engine-level throughput, in-process batched forward (not what stip serve does today)"
                 + title_tail)
    return written + [_save(plt, fig, out, "throughput")]


def _concurrent_plot(plt, cc: dict, out: Path, title_tail: str) -> list[str]:
    """Aggregate tokens/s against the number of users, per server and for plain batched generate."""
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    ns = [r["clients"] for r in cc["rows"]]
    ax.plot(ns, [r["plain_batch_tokens_per_s"]["median"] for r in cc["rows"]], "o-", color="#8c8c8c",
            label="plain generate at batch N (in-process)")
    for label, color in zip(cc["servers"], ("#4c72b0", "#dd8452", "#55a868")):
        ax.plot(ns, [r["servers"][label]["tokens_per_s"]["median"] for r in cc["rows"]], "o-", color=color,
                label=f"N stip.Client users through `{label}`")
    ax.set_xticks(ns)
    ax.set_xlabel("concurrent users N")
    ax.set_ylabel("aggregate tokens/s (median)")
    ax.set_ylim(bottom=0)
    ax.set_title("Concurrent users: what the server gives vs plain batched generate" + title_tail)
    ax.legend(fontsize=8)
    return [_save(plt, fig, out, "concurrent")]


def _mpc_plot(plt, mpc: dict, out: Path, title_tail: str) -> list[str]:
    """One decoder block per decoded token: plain against CrypTen on loopback and (estimated) on each network."""
    d, layers = mpc["decode"], mpc["extrapolated"]["layers"]
    names = ["plain block\n(STIP server)", "CrypTen 2PC\n(loopback)"]
    vals = [d["plain_seconds"] * 1e3, d["mpc_seconds"] * 1e3]
    for e in mpc.get("over_network_estimate", []):
        names.append(f"CrypTen 2PC\n{e['name']} (est.)")
        vals.append(e["block_s"] * 1e3)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(vals) + 1), 4.5))
    ax.bar(range(len(vals)), vals, color=["#4c72b0"] + ["#c44e52"] * (len(vals) - 1))
    ax.set_yscale("log")
    ax.set_xticks(range(len(vals)), names, fontsize=8)
    ax.set_ylabel(f"ms per decoded token, one block of {layers} (log)")
    ax.set_title(f"One decoder block, one decoded token (context {d['context']}): plain vs secure 2PC"
                 + title_tail)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:,.0f} ms" if v >= 100 else f"{v:.3g} ms", ha="center", va="bottom", fontsize=8)
    return [_save(plt, fig, out, "mpc")]


PLOTTED = [  # (results key, its plots), in the order they are drawn
    ("end_to_end", _latency_plot),
    ("server_cost", _server_cost_plots),
    ("concurrent", _concurrent_plot),
    ("mpc", _mpc_plot),
]


def plots(results: dict, out: Path) -> list[str]:
    """Draw the plots of the parts that ran into `out`; their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    title_tail = "\n(quick smoke run: tiny model, few repeats)" if results["meta"]["quick"] else ""
    for key, draw in PLOTTED:
        part = results.get(key)
        if part:
            written += draw(plt, part, out, title_tail)
    return written
