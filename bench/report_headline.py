"""The headline figures: one (figure, value, target) row per must-show, printed after a run and tabled at the top of
results.md."""

from __future__ import annotations

from bench.report_format import mid, nbytes, num, span

SCALE_TARGETS = {  # issue 8's must-shows: (row, its ratio key, target), at the largest client count
    ("round-trip, transformers (default, batched)", "ratio_also"): 4.0,
    ("round-trip, transformers (default, batched)", "ratio"): 0.9,
    ("server-decode, vllm", "ratio"): 0.95,
}


def scale_headline(sc: dict | None) -> list[tuple[str, str, str]]:
    """The serving-at-scale must-shows, at the largest client count: value and target."""
    if not sc:
        return []
    out = []
    for row in sc["rows"]:
        cell = row["cells"][-1]
        for (label, key), target in SCALE_TARGETS.items():
            if row["label"] == label and key in cell:
                other = row["baseline" if key == "ratio" else "also"]
                out.append((f"{cell['clients']} clients, `{label}` / `{other}`: aggregate tokens/s "
                             f"(ratio range over rounds)",
                             f"{num(cell[key]['median'], 2)}x ({span(cell[key], 2)})", f">= {target}"))
        if row["label"] == "server-decode, vllm" and "same_tokens" in cell:
            out.append((f"{cell['clients']} clients, `server-decode, vllm`: greedy tokens equal plain vLLM's",
                        num(cell["same_tokens"]), "yes"))
    return out


def headline(results: dict) -> list[tuple[str, str, str]]:
    """(figure, value, target) rows."""
    rows = []
    cc = results.get("concurrent")
    if cc:
        for r in cc["rows"]:
            for label, v in r["servers"].items():
                rows.append((f"{r['clients']} concurrent user(s) through `{label}` (stip.Client processes): "
                             f"aggregate tokens/s, vs plain generate at batch {r['clients']}",
                             f"{mid(v['tokens_per_s'], 1)} vs {mid(r['plain_batch_tokens_per_s'], 1)} "
                             f"({num(v['ratio_to_plain']['median'], 2)}x)", ""))
    rows += scale_headline(results.get("scale"))
    e2e = results.get("end_to_end")
    if e2e:
        plain = next(r for r in e2e["rows"] if r["variant"] == "plain")
        rows.append(("Plain transformers generate, per token (ms)", mid(plain["per_token_ms"]), ""))
        for r in e2e["rows"]:
            if r["variant"] == "plain":
                continue
            where = r["network"]
            rows.append((f"stip.Client, {r['downlink']} downlink over {where}: per token (ms)",
                         mid(r["per_token_ms"]), ""))
            if where == "loopback":
                rows.append((f"STIP / plain per token, {r['downlink']} downlink, loopback",
                             f"{num(r['ratio_to_plain']['median'], 3)} (range {span(r['ratio_to_plain'])})",
                             "<= 1.15"))
                rows.append((f"Bytes per token, {r['downlink']} downlink (up / down)",
                             f"{nbytes(r['bytes_up_per_token'])} / {nbytes(r['bytes_down_per_token'])}", ""))
    sc = results.get("server_cost")
    if sc:
        wp = sc["worst_config_ratio_per_process"]
        rows.append(("Engine level (in-process batched forward, not what `stip serve` does today): protected / plain "
                     "throughput, worst config / median over configs",
                     f"{num(sc['ratio_min'], 3)} / {num(sc['ratio_median'], 3)}", ">= 0.98"))
        rows.append((f"Run to run: worst config's ratio in each of {wp['n']} fresh processes",
                     f"{num(wp['median'], 3)} (range {span(wp)})", ""))
    pb = results.get("protect")
    if pb:
        rows.append(("Protect throughput (MB/s) / peak RSS (GB)",
                     f"{num(pb['mb_per_s'], 1)} / {num(pb['peak_rss_gb'], 3)} "
                     f"({num(pb['checkpoint_bytes'] / 1e9, 2)} GB checkpoint)",
                     f"RSS < {num(pb['rss_bound_gb'], 2)} GB"))
    mpc = results.get("mpc")
    if mpc:
        d, x = mpc["decode"], mpc["extrapolated"]
        rows.append((f"Secure 2PC (CrypTen), per decoded token: one decoder block, CrypTen / plain (loopback, "
                     f"context {d['context']})",
                     f"{num(d['speedup'], 0)}x ({num(d['mpc_seconds'] * 1e3, 1)} ms vs "
                     f"{num(d['plain_seconds'] * 1e3, 3)} ms)", ""))
        rows.append((f"Secure 2PC per decoded token, all {x['layers']} blocks (extrapolated: one block x "
                     f"{x['layers']})",
                     f"{num(x['mpc_seconds_per_token'], 2)} s vs {num(x['plain_seconds_per_token'] * 1e3, 2)} ms plain",
                     ""))
    return rows
