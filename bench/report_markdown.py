"""results.md: one function per section (the run, the machine, the headline figures, then one per benchmark part), so
that each part's table reads on its own."""

from __future__ import annotations

from bench.report_format import PLOTS, mid, nbytes, num, row_label, span, table
from bench.report_headline import headline


def _run_lines(results: dict) -> list[str]:
    """Title, the dirty-tree warning, command, commit and timing, then any errors and skipped parts."""
    meta = results["meta"]
    tree = meta.get("git") or {}
    lines = [f"# STIP benchmarks{' (quick smoke run)' if meta['quick'] else ''}", ""]
    if not tree.get("clean"):
        lines += [f"**DIRTY TREE - not for committing**: run with {tree.get('changes', '?')} uncommitted change(s) "
                  f"on top of commit `{tree.get('commit') or 'unknown'}`; these figures describe no commit.", ""]
    lines += [f"Command: `{meta['command']}`  ",
              f"Commit: `{tree.get('commit') or 'unknown'}`, tree {'clean' if tree.get('clean') else 'DIRTY'}.  ",
              f"Started {meta['started']}, took {meta['seconds']:.0f} s. Model: {meta['model']}."
              + ("" if meta.get("all_parts", True) else f" Parts run: {', '.join(meta['parts'])} (not all)."), ""]
    if results.get("errors"):
        lines += ["**Errors:**", ""] + [f"- {k}: `{v}`" for k, v in results["errors"].items()] + [""]
    if results.get("skipped"):
        lines += ["**Skipped (optional package missing):**", ""] + [f"- {k}: {v}" for k, v in
                                                                    results["skipped"].items()] + [""]
    return lines


def _other_processes(o: dict | None) -> str:
    return (f"{o['cpu_seconds']} CPU-s ({o['share_of_capacity']:.1%} of capacity), steal {o['steal_cpu_seconds']} "
            f"CPU-s" if o else "-")


def _machine_lines(m: dict) -> list[str]:
    return ["## Machine", "", table(["", ""], [
        ["CPU", f"{m['cpu']} ({', '.join(m.get('cpu_simd') or [])})"],
        ["cores (available)", f"{m['cores']} ({m['cores_available']})"],
        ["memory", f"{m['memory_gb']} GB"], ["torch threads", m["torch_threads"]], ["OS", m["os"]],
        ["Python", m["python"]],
        ["versions", ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)],
        ["git", m["git_commit"]],
        ["load average (1/5/15 min) at start / end",
         f"{m['load_average_at_start']} / {m.get('load_average_at_end')}"],
        ["other processes during the run", _other_processes(m.get("other_processes_during_run"))],
    ]), ""]


def _server_cost_verdict(sc: dict) -> str:
    """Whether the worst pooled ratio meets the target, and if not, whether single processes' spread explains it."""
    wp = sc["worst_config_ratio_per_process"]
    if sc["ratio_min"] >= sc["target_ratio"]:
        return "Every config's pooled ratio is within the target. "
    return (f"The worst pooled ratio, {num(sc['ratio_min'], 3)}, misses the {sc['target_ratio']} target"
            + (" inside the spread of single processes' worst ratios, which reach "
               f"{num(wp['max'], 3)}: noise of this machine at this precision, not a measured cost of "
               f"the protection. " if wp["max"] >= sc["target_ratio"]
               else " in every process: a consistent cost, not noise. "))


def _server_cost_lines(sc: dict) -> list[str]:
    """Section 1."""
    wp = sc["worst_config_ratio_per_process"]
    return ["## 1. Server-side cost: protected vs plain model, same engine (engine-level, in-process batched "
            "forward; not what `stip serve` does today)", "",
            f"Engine: {sc['engine']}. Inputs: {sc['inputs']}. Loading: {sc['loading']}. Method: {sc['method']}. "
            f"torch threads: {sc['torch_threads']}. Max |logit difference| plain vs un-permuted protected "
            f"on one prompt: {sc['max_abs_logit_diff']:.2e}.", "",
            table(["config", "plain tok/s", "protected tok/s", "ratio protected/plain", "ratio range", "n",
                   "ratio per process: median (range)"],
                  [[row_label(r), mid(r["plain_tokens_per_s"], 1), mid(r["protected_tokens_per_s"], 1),
                    mid(r["ratio"], 3), span(r["ratio"]), r["ratio"]["n"],
                    f"{num(r['ratio_per_process']['median'], 3)} ({span(r['ratio_per_process'])})"]
                   for r in sc["rows"]]), "",
            f"Run to run: the worst config's ratio in each of {wp['n']} fresh processes spans {span(wp)} "
            f"(median {num(wp['median'], 3)}). " + _server_cost_verdict(sc), "",
            f"![server throughput ratio]({PLOTS['ratio']})  ![server throughput]({PLOTS['throughput']})", ""]


def _concurrent_lines(cc: dict) -> list[str]:
    """Section 2."""
    labels = list(cc["servers"])
    return ["## 2. Concurrent users through the server: what `stip serve` gives N users at once", "",
            f"Method: {cc['method']}. Prompt: {cc['prompt_tokens']} tokens. Servers: "
            + "; ".join(f"`{k}` ({' '.join(v['args'])})" for k, v in cc["servers"].items())
            + ". Same greedy tokens as plain: "
            + ", ".join(f"{k}: {num(v)}" for k, v in cc["same_tokens_as_plain"].items()) + ".", "",
            table(["users N", "plain generate, batch N: tok/s"]
                  + [h for lab in labels for h in (f"`{lab}`: tok/s", "/ plain", "per user ms/token")],
                  [[r["clients"], mid(r["plain_batch_tokens_per_s"], 1)]
                   + [c for lab in labels for c in (mid(r["servers"][lab]["tokens_per_s"], 1),
                                                     num(r["servers"][lab]["ratio_to_plain"]["median"], 2),
                                                     mid(r["servers"][lab]["per_client_ms_per_token"], 1))]
                   for r in cc["rows"]]), "",
            f"![concurrent users]({PLOTS['concurrent']})", ""]


def _end_to_end_row(r: dict) -> list:
    """One variant and network: the plain row has only its totals."""
    stip = r["variant"] != "plain"
    return [r["variant"], r["network"], mid(r["per_token_ms"]), span(r["per_token_ms"], 2),
            num(r["client_ms"]["median"], 3) if stip else "-",
            num(r["server_ms"]["median"]) if stip else "-",
            (num(r["wire_ms"]["median"], 3) + (f" ({num(r['link_model_ms'], 2)})" if "link_model_ms" in r
                                               else "")) if stip else "-",
            nbytes(r["bytes_up_per_token"]) if stip else "-",
            nbytes(r["bytes_down_per_token"]) if stip else "-",
            f"{num(r['ratio_to_plain']['median'], 3)} ({span(r['ratio_to_plain'])})" if stip else "1",
            mid(r["ttft_ms"], 1), num(r.get("same_tokens_as_plain")) if stip else "-"]


def _end_to_end_lines(e2e: dict) -> list[str]:
    """Section 3, with the simulated networks as configured and as measured."""
    lines = ["## 3. End to end: plain generate vs `stip.Client` (server process + client, one round trip per "
             "token)", "",
             f"{e2e['server']}. Prompt: {e2e['prompt_tokens']} tokens. Method: {e2e['method']}. "
             "Per token = one decode step as the client sees it; the client's `Timing` splits it into client "
             "compute, server compute (`server_ms` reported by the server) and wire (round trip - server: network, "
             "WebSocket framing, event loops); in brackets, what the simulated link alone accounts for "
             "(RTT + both messages at the link rate): the wire time over a simulated link is that plus the "
             "loopback row's wire time (the software's own share). Bytes: WebSocket message payloads of one "
             "decode step.", ""]
    lines += [table(["variant", "network", "per token ms", "range", "client ms", "server ms",
                     "wire ms (link model)",
                     "up B/token", "down B/token", "ratio to plain (range)", "first token ms",
                     "same tokens"], [_end_to_end_row(r) for r in e2e["rows"]]), ""]
    lines += ["### Simulated networks", "",
              "A relay process (`bench/netsim.py`) between client and server adds half the RTT each way and "
              "serialises bytes at the link rate; 'measured' is what the relay delivered in a calibration "
              "(64-byte round trip, one-way bulk transfer).", "",
              table(["network", "configured RTT ms", "configured Mbit/s", "measured RTT ms", "measured Mbit/s"],
                    [[n["label"], num(n["rtt_ms"]), num(n["mbit"], 0), num(n["measured"]["rtt_ms"], 3),
                      num(n["measured"]["mbit"], 1)]
                     for k, n in e2e["networks"].items() if k != "loopback"]), "",
              f"![per-token latency breakdown]({PLOTS['latency']})", ""]
    return lines


def _protect_lines(pb: dict) -> list[str]:
    """Section 4."""
    return ["## 4. Protect: throughput and peak memory", "",
            f"`{pb['command']}` on a synthetic LLaMA-shaped fp32 checkpoint ({pb['layers']} layers, "
            f"{pb['tensors']} tensors, {pb['shards']} shard(s)).", "",
            table(["checkpoint", "seconds", "MB/s", "peak RSS", "bound (3 x largest tensor + 1.5 GB)",
                   "within bound"],
                  [[nbytes(pb["checkpoint_bytes"]), num(pb["seconds"]), num(pb["mb_per_s"], 1),
                    f"{num(pb['peak_rss_gb'], 3)} GB", f"{num(pb['rss_bound_gb'], 3)} GB",
                    num(pb["within_bound"])]]), ""]


def _mpc_step_row(name: str, r: dict) -> list:
    return [name, f"{num(r['mpc_seconds'] * 1e3, 1)} ms", ", ".join(f"{t * 1e3:.0f}" for t in
                                                                    r["mpc_seconds_all"]) + " ms",
            f"{num(r['plain_seconds'] * 1e3, 3)} ms", f"{num(r['speedup'], 0)}x", nbytes(r["comm_bytes"]),
            r["rounds"], f"{r['max_abs_error']:.2e}"]


def _mpc_lines(mpc: dict) -> list[str]:
    """Section 5, with the estimate over the simulated networks when the run made one."""
    s, d, x = mpc["shape"], mpc["decode"], mpc["extrapolated"]
    lines = ["## 5. Secure two-party computation baseline (CrypTen), per decoded token", "",
             f"One LLaMA decoder block (d={s['d']}, {s['n_heads']} heads / {s['n_kv_heads']} KV heads, "
             f"ffn {s['m']}) under {mpc['protocol']}, two processes, {mpc['threads']['mpc_per_party']} thread "
             f"per party; the same block in plain torch on {mpc['threads']['plain']} thread(s). Decode (the "
             f"headline, per token as in section 3): one new token attending to a secret-shared KV cache of "
             f"{d['context']} tokens. Prefill (secondary): {s['T']} tokens at once. STIP's server runs the "
             f"plain block (section 1: the same cost as the unprotected model).", "",
             table(["step", "CrypTen block (median)", "all runs", "plain block", "CrypTen / plain",
                    "communication", "rounds", "max abs error"],
                   [_mpc_step_row(f"decode: 1 token, context {d['context']}", d),
                    _mpc_step_row(f"prefill: {mpc['prefill']['tokens']} tokens", mpc["prefill"])]), "",
             f"Whole model per decoded token, **extrapolated** ({x['note']}): CrypTen "
             f"{num(x['mpc_seconds_per_token'], 2)} s, {nbytes(x['comm_bytes_per_token'])} and "
             f"{x['rounds_per_token']:,} rounds, vs {num(x['plain_seconds_per_token'] * 1e3, 2)} ms plain.", ""]
    est = mpc.get("over_network_estimate")
    if est:
        lines += ["Decode over the simulated networks (an estimate, not a measurement: loopback time + rounds x "
                  "RTT + bytes / rate; both parties' traffic is counted once):", "",
                  table(["network", "CrypTen block, per token", f"all {x['layers']} blocks, per token "
                         "(extrapolated)", "vs plain block"],
                        [[e["label"], f"{num(e['block_s'], 3)} s", f"{num(e['per_token_s'], 1)} s",
                          f"{num(e['vs_plain'], 0)}x"] for e in est]), ""]
    lines += [f"![MPC vs plain]({PLOTS['mpc']})", ""]
    return lines


def _scale_ratio(row: dict, cell: dict) -> str:
    """'0.93x plain HF generate; 4.6x round-trip, transformers --no-batching' (medians)."""
    out = [f"{num(cell[key]['median'], 2)}x {row[name]}" for key, name in (("ratio", "baseline"),
                                                                         ("ratio_also", "also")) if key in cell]
    return "; ".join(out) or "-"


def _scale_notes(sc: dict) -> list[str]:
    """Below the scale table: where outputs left the reference, failed groups, the vLLM settings, skipped rows."""
    lines = []
    for row in sc["rows"]:
        for c in row["cells"]:
            d = c.get("first_difference")
            if d:
                lines += [f"- `{row['label']}`, N={c['clients']}: {d['clients_differing']} of {d['of']} outputs "
                          f"differ from the reference, the first at new token {d['token'] + 1}: {d['got']} instead "
                          f"of {d['expected']}"]
    if any(c.get("first_difference") for row in sc["rows"] for c in row["cells"]):
        lines.append("")
    for group, error in (sc.get("errors") or {}).items():
        lines += [f"**The {group} rows failed** and are not in the table: `{error[:1500]}`", ""]
    if sc.get("vllm_python"):
        lines += [f"vLLM: `{sc['vllm_python']}`, settings {sc['vllm_settings']}.", ""]
    for label, why in sc.get("skipped", {}).items():
        lines += [f"- {label}: skipped: {why}"]
    if sc.get("skipped"):
        lines.append("")
    return lines


def scale_markdown(sc: dict) -> list[str]:
    """Section 6: one row per configuration, per client count ms/token, tokens/s, ratio and same tokens."""
    counts = [c["clients"] for c in sc["rows"][0]["cells"]] if sc["rows"] else []
    header = ["configuration"] + [h for n in counts for h in (f"N={n}: ms/token", f"N={n}: tok/s", f"N={n}: ratio",
                                                               f"N={n}: same tokens")]
    rows = []
    for row in sc["rows"]:
        cells = []
        for c in row["cells"]:
            ticks = f" ({num(c['rows_per_tick'], 1)} rows/tick)" if c.get("rows_per_tick") else ""
            cells += [mid(c["per_token_ms"], 1), mid(c["tokens_per_s"], 1) + ticks, _scale_ratio(row, c),
                      num(c.get("same_tokens")) if "same_tokens" in c else "-"]
        rows.append([row["label"]] + cells)
    for label in sc.get("skipped", {}):
        rows.append([label] + ["skipped"] + ["-"] * (len(header) - 2))
    lines = ["## 6. Serving at scale: plain HF and vLLM, round-trip and server-decode on each engine", "",
             f"Method: {sc['method']}. Prompt: {sc['prompt_tokens']} tokens. Ratios: aggregate tokens/s over the "
             f"row's plain baseline (our engine's rows over plain HF `generate`, the vLLM rows over plain vLLM on the "
             f"unprotected checkpoint; the batched round-trip also over the serial one), median of the per-round "
             f"ratios. Same tokens: every client's greedy tokens equal the baseline's (plain vLLM's: equal plain "
             f"HF's).", "", table(header, rows), ""]
    return lines + _scale_notes(sc)


SECTIONS = [  # (results key, its section), in the order results.md has them; a part not run has none
    ("server_cost", _server_cost_lines),
    ("concurrent", _concurrent_lines),
    ("end_to_end", _end_to_end_lines),
    ("protect", _protect_lines),
    ("mpc", _mpc_lines),
    ("scale", scale_markdown),
]


def markdown(results: dict) -> str:
    lines = _run_lines(results) + _machine_lines(results["machine"])
    lines += ["## Headline figures", "", table(["figure", "value: median [IQR]", "target"],
                                               [list(r) for r in headline(results)]), ""]
    for key, section in SECTIONS:
        if results.get(key):
            lines += section(results[key])
    lines += ["## Notes", "", *[f"- {n}" for n in results.get("notes", [])], ""]
    return "\n".join(lines)
