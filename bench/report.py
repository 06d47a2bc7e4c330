"""Summaries, machine details, and the written results: results.json, results.md (Markdown tables) and PNG plots."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PLOTS = {
    "latency": "latency_breakdown.png",
    "ratio": "server_throughput_ratio.png",
    "throughput": "server_throughput.png",
    "mpc": "mpc_vs_plain.png",
    "concurrent": "concurrent_users.png",
}


# ------------------------------------------------------------------------------------------------ statistics


def summarize(xs) -> dict:
    """Median with its spread: quartiles (inclusive method) and range."""
    xs = [float(x) for x in xs]
    if not xs:
        return {"median": float("nan"), "p25": float("nan"), "p75": float("nan"), "min": float("nan"),
                "max": float("nan"), "n": 0}
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "p25": q[0], "p75": q[2], "min": min(xs), "max": max(xs), "n": len(xs)}


def paired(a, b) -> dict:
    """Summary of the paired ratios a[i] / b[i]."""
    return summarize([x / y for x, y in zip(a, b)])


# ------------------------------------------------------------------------------------------------ machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent.parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    try:
        mem = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        mem = None
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain")
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
        simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    except (OSError, IndexError):
        simd = []
    return {
        "cpu": _cpu_model(),
        "cpu_simd": simd,
        "cores": os.cpu_count(),
        "cores_available": affinity,
        "memory_gb": round(mem / 2**30, 1) if mem else None,
        "torch_threads": torch.get_num_threads(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {n: _version(n) for n in ("stip", "torch", "transformers", "crypten", "websockets", "uvicorn",
                                              "numpy", "matplotlib")},
        "git_commit": (commit[:12] + ("+dirty" if dirty else "")) if commit else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def command_line() -> str:
    """The command that ran, as a user would type it."""
    import shlex

    argv = sys.argv
    if argv and (Path(argv[0]).name in ("stip", "cli.py") or argv[0].endswith("stip/cli.py")):
        return shlex.join(["stip", *argv[1:]])
    if argv and Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name == "bench":
        return shlex.join(["python", "-m", "bench", *argv[1:]])  # the suite, also as `stip bench` starts it
    if argv and Path(argv[0]).name == "__main__.py":
        return shlex.join(["python", "-m", "stip.cli", *argv[1:]])
    return shlex.join([Path(sys.executable).name, *argv])


# ------------------------------------------------------------------------------------------------ formatting


def _f(x, nd=2) -> str:
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


def _mid(s: dict, nd=2) -> str:
    """median [p25-p75]"""
    return f"{_f(s['median'], nd)} [{_f(s['p25'], nd)}-{_f(s['p75'], nd)}]"


def _range(s: dict, nd=3) -> str:
    return f"{_f(s['min'], nd)}-{_f(s['max'], nd)}"


def _bytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, size in (("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _grouped_bars(ax, rows: list[dict], series: list[tuple[str, str, str]]) -> None:
    """One group of bars per row, one bar per (key, label, colour) series: the median, with the IQR as error bar."""
    w = 0.8 / len(series)
    for j, (key, name, color) in enumerate(series):
        med = [r[key]["median"] for r in rows]
        err = [[m - r[key]["p25"] for m, r in zip(med, rows)], [r[key]["p75"] - m for m, r in zip(med, rows)]]
        ax.bar([i + (j - (len(series) - 1) / 2) * w for i in range(len(rows))], med, w, yerr=err, capsize=3,
               color=color, label=name)


def _row_label(r: dict) -> str:
    if r["phase"] == "prefill":
        return f"prefill B={r['batch']} T={r['tokens']}"
    return f"decode B={r['batch']} (ctx {r['context']})"


SCALE_TARGETS = {  # issue 8's must-shows: (row, its ratio key, target), at the largest client count
    ("round-trip, transformers (default, batched)", "ratio_also"): 4.0,
    ("round-trip, transformers (default, batched)", "ratio"): 0.9,
    ("server-decode, vllm", "ratio"): 0.95,
}


def _scale_ratio(row: dict, cell: dict) -> str:
    """'0.93x plain HF generate; 4.6x round-trip, transformers --no-batching' (medians)."""
    out = [f"{_f(cell[key]['median'], 2)}x {row[name]}" for key, name in (("ratio", "baseline"),
                                                                        ("ratio_also", "also")) if key in cell]
    return "; ".join(out) or "-"


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
                             f"{_f(cell[key]['median'], 2)}x ({_range(cell[key], 2)})", f">= {target}"))
        if row["label"] == "server-decode, vllm" and "same_tokens" in cell:
            out.append((f"{cell['clients']} clients, `server-decode, vllm`: greedy tokens equal plain vLLM's",
                        _f(cell["same_tokens"]), "yes"))
    return out


def scale_markdown(sc: dict) -> list[str]:
    """Section 6: one row per configuration, per client count ms/token, tokens/s, ratio and same tokens."""
    counts = [c["clients"] for c in sc["rows"][0]["cells"]] if sc["rows"] else []
    header = ["configuration"] + [h for n in counts for h in (f"N={n}: ms/token", f"N={n}: tok/s", f"N={n}: ratio",
                                                               f"N={n}: same tokens")]
    rows = []
    for row in sc["rows"]:
        cells = []
        for c in row["cells"]:
            ticks = f" ({_f(c['rows_per_tick'], 1)} rows/tick)" if c.get("rows_per_tick") else ""
            cells += [_mid(c["per_token_ms"], 1), _mid(c["tokens_per_s"], 1) + ticks, _scale_ratio(row, c),
                      _f(c.get("same_tokens")) if "same_tokens" in c else "-"]
        rows.append([row["label"]] + cells)
    for label in sc.get("skipped", {}):
        rows.append([label] + ["skipped"] + ["-"] * (len(header) - 2))
    lines = ["## 6. Serving at scale: plain HF and vLLM, round-trip and server-decode on each engine", "",
             f"Method: {sc['method']}. Prompt: {sc['prompt_tokens']} tokens. Ratios: aggregate tokens/s over the "
             f"row's plain baseline (our engine's rows over plain HF `generate`, the vLLM rows over plain vLLM on the "
             f"unprotected checkpoint; the batched round-trip also over the serial one), median of the per-round "
             f"ratios. Same tokens: every client's greedy tokens equal the baseline's (plain vLLM's: equal plain "
             f"HF's).", "", _table(header, rows), ""]
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


def headline(results: dict) -> list[tuple[str, str, str]]:
    """(figure, value, target) rows."""
    rows = []
    cc = results.get("concurrent")
    if cc:
        for r in cc["rows"]:
            for label, v in r["servers"].items():
                rows.append((f"{r['clients']} concurrent user(s) through `{label}` (stip.Client processes): "
                             f"aggregate tokens/s, vs plain generate at batch {r['clients']}",
                             f"{_mid(v['tokens_per_s'], 1)} vs {_mid(r['plain_batch_tokens_per_s'], 1)} "
                             f"({_f(v['ratio_to_plain']['median'], 2)}x)", ""))
    rows += scale_headline(results.get("scale"))
    e2e = results.get("end_to_end")
    if e2e:
        plain = next(r for r in e2e["rows"] if r["variant"] == "plain")
        rows.append(("Plain transformers generate, per token (ms)", _mid(plain["per_token_ms"]), ""))
        for r in e2e["rows"]:
            if r["variant"] == "plain":
                continue
            where = r["network"]
            rows.append((f"stip.Client, {r['downlink']} downlink over {where}: per token (ms)",
                         _mid(r["per_token_ms"]), ""))
            if where == "loopback":
                rows.append((f"STIP / plain per token, {r['downlink']} downlink, loopback",
                             f"{_f(r['ratio_to_plain']['median'], 3)} (range {_range(r['ratio_to_plain'])})",
                             "<= 1.15"))
                rows.append((f"Bytes per token, {r['downlink']} downlink (up / down)",
                             f"{_bytes(r['bytes_up_per_token'])} / {_bytes(r['bytes_down_per_token'])}", ""))
    sc = results.get("server_cost")
    if sc:
        wp = sc["worst_config_ratio_per_process"]
        rows.append(("Engine level (in-process batched forward, not what `stip serve` does today): protected / plain "
                     "throughput, worst config / median over configs",
                     f"{_f(sc['ratio_min'], 3)} / {_f(sc['ratio_median'], 3)}", ">= 0.98"))
        rows.append((f"Run to run: worst config's ratio in each of {wp['n']} fresh processes",
                     f"{_f(wp['median'], 3)} (range {_range(wp)})", ""))
    pb = results.get("protect")
    if pb:
        rows.append(("Protect throughput (MB/s) / peak RSS (GB)",
                     f"{_f(pb['mb_per_s'], 1)} / {_f(pb['peak_rss_gb'], 3)} "
                     f"({_f(pb['checkpoint_bytes'] / 1e9, 2)} GB checkpoint)",
                     f"RSS < {_f(pb['rss_bound_gb'], 2)} GB"))
    mpc = results.get("mpc")
    if mpc:
        d, x = mpc["decode"], mpc["extrapolated"]
        rows.append((f"Secure 2PC (CrypTen), per decoded token: one decoder block, CrypTen / plain (loopback, "
                     f"context {d['context']})",
                     f"{_f(d['speedup'], 0)}x ({_f(d['mpc_seconds'] * 1e3, 1)} ms vs "
                     f"{_f(d['plain_seconds'] * 1e3, 3)} ms)", ""))
        rows.append((f"Secure 2PC per decoded token, all {x['layers']} blocks (extrapolated: one block x "
                     f"{x['layers']})",
                     f"{_f(x['mpc_seconds_per_token'], 2)} s vs {_f(x['plain_seconds_per_token'] * 1e3, 2)} ms plain",
                     ""))
    return rows


def markdown(results: dict) -> str:
    m, meta = results["machine"], results["meta"]
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
    lines += ["## Machine", "", _table(["", ""], [
        ["CPU", f"{m['cpu']} ({', '.join(m.get('cpu_simd') or [])})"],
        ["cores (available)", f"{m['cores']} ({m['cores_available']})"],
        ["memory", f"{m['memory_gb']} GB"], ["torch threads", m["torch_threads"]], ["OS", m["os"]],
        ["Python", m["python"]],
        ["versions", ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)],
        ["git", m["git_commit"]],
        ["load average (1/5/15 min) at start / end",
         f"{m['load_average_at_start']} / {m.get('load_average_at_end')}"],
        ["other processes during the run", (lambda o: f"{o['cpu_seconds']} CPU-s ({o['share_of_capacity']:.1%} of "
                                                      f"capacity), steal {o['steal_cpu_seconds']} CPU-s"
                                            if o else "-")(m.get("other_processes_during_run"))],
    ]), ""]
    lines += ["## Headline figures", "", _table(["figure", "value: median [IQR]", "target"],
                                                [list(r) for r in headline(results)]), ""]

    sc = results.get("server_cost")
    if sc:
        wp = sc["worst_config_ratio_per_process"]
        lines += ["## 1. Server-side cost: protected vs plain model, same engine (engine-level, in-process batched "
                  "forward; not what `stip serve` does today)", "",
                  f"Engine: {sc['engine']}. Inputs: {sc['inputs']}. Loading: {sc['loading']}. Method: {sc['method']}. "
                  f"torch threads: {sc['torch_threads']}. Max |logit difference| plain vs un-permuted protected "
                  f"on one prompt: {sc['max_abs_logit_diff']:.2e}.", "",
                  _table(["config", "plain tok/s", "protected tok/s", "ratio protected/plain", "ratio range", "n",
                          "ratio per process: median (range)"],
                         [[_row_label(r), _mid(r["plain_tokens_per_s"], 1), _mid(r["protected_tokens_per_s"], 1),
                           _mid(r["ratio"], 3), _range(r["ratio"]), r["ratio"]["n"],
                           f"{_f(r['ratio_per_process']['median'], 3)} ({_range(r['ratio_per_process'])})"]
                          for r in sc["rows"]]), "",
                  f"Run to run: the worst config's ratio in each of {wp['n']} fresh processes spans {_range(wp)} "
                  f"(median {_f(wp['median'], 3)}). "
                  + ("Every config's pooled ratio is within the target. " if sc["ratio_min"] >= sc["target_ratio"]
                     else f"The worst pooled ratio, {_f(sc['ratio_min'], 3)}, misses the {sc['target_ratio']} target"
                          + (" inside the spread of single processes' worst ratios, which reach "
                             f"{_f(wp['max'], 3)}: noise of this machine at this precision, not a measured cost of "
                             f"the protection. " if wp["max"] >= sc["target_ratio"]
                             else " in every process: a consistent cost, not noise. ")), "",
                  f"![server throughput ratio]({PLOTS['ratio']})  ![server throughput]({PLOTS['throughput']})", ""]

    cc = results.get("concurrent")
    if cc:
        labels = list(cc["servers"])
        lines += ["## 2. Concurrent users through the server: what `stip serve` gives N users at once", "",
                  f"Method: {cc['method']}. Prompt: {cc['prompt_tokens']} tokens. Servers: "
                  + "; ".join(f"`{k}` ({' '.join(v['args'])})" for k, v in cc["servers"].items())
                  + ". Same greedy tokens as plain: "
                  + ", ".join(f"{k}: {_f(v)}" for k, v in cc["same_tokens_as_plain"].items()) + ".", "",
                  _table(["users N", "plain generate, batch N: tok/s"]
                         + [h for lab in labels for h in (f"`{lab}`: tok/s", "/ plain", "per user ms/token")],
                         [[r["clients"], _mid(r["plain_batch_tokens_per_s"], 1)]
                          + [c for lab in labels for c in (_mid(r["servers"][lab]["tokens_per_s"], 1),
                                                            _f(r["servers"][lab]["ratio_to_plain"]["median"], 2),
                                                            _mid(r["servers"][lab]["per_client_ms_per_token"], 1))]
                          for r in cc["rows"]]), "",
                  f"![concurrent users]({PLOTS['concurrent']})", ""]

    e2e = results.get("end_to_end")
    if e2e:
        lines += ["## 3. End to end: plain generate vs `stip.Client` (server process + client, one round trip per "
                  "token)", "",
                  f"{e2e['server']}. Prompt: {e2e['prompt_tokens']} tokens. Method: {e2e['method']}. "
                  "Per token = one decode step as the client sees it; the client's `Timing` splits it into client "
                  "compute, server compute (`server_ms` reported by the server) and wire (round trip - server: network, "
                  "WebSocket framing, event loops); in brackets, what the simulated link alone accounts for "
                  "(RTT + both messages at the link rate): the wire time over a simulated link is that plus the "
                  "loopback row's wire time (the software's own share). Bytes: WebSocket message payloads of one "
                  "decode step.", ""]
        rows = []
        for r in e2e["rows"]:
            stip = r["variant"] != "plain"
            rows.append([r["variant"], r["network"], _mid(r["per_token_ms"]), _range(r["per_token_ms"], 2),
                         _f(r["client_ms"]["median"], 3) if stip else "-",
                         _f(r["server_ms"]["median"]) if stip else "-",
                         (_f(r["wire_ms"]["median"], 3) + (f" ({_f(r['link_model_ms'], 2)})" if "link_model_ms" in r
                                                             else "")) if stip else "-",
                         _bytes(r["bytes_up_per_token"]) if stip else "-",
                         _bytes(r["bytes_down_per_token"]) if stip else "-",
                         f"{_f(r['ratio_to_plain']['median'], 3)} ({_range(r['ratio_to_plain'])})" if stip else "1",
                         _mid(r["ttft_ms"], 1), _f(r.get("same_tokens_as_plain")) if stip else "-"])
        lines += [_table(["variant", "network", "per token ms", "range", "client ms", "server ms",
                          "wire ms (link model)",
                          "up B/token", "down B/token", "ratio to plain (range)", "first token ms",
                          "same tokens"], rows), ""]
        lines += ["### Simulated networks", "",
                  "A relay process (`bench/netsim.py`) between client and server adds half the RTT each way and "
                  "serialises bytes at the link rate; 'measured' is what the relay delivered in a calibration "
                  "(64-byte round trip, one-way bulk transfer).", "",
                  _table(["network", "configured RTT ms", "configured Mbit/s", "measured RTT ms", "measured Mbit/s"],
                         [[n["label"], _f(n["rtt_ms"]), _f(n["mbit"], 0), _f(n["measured"]["rtt_ms"], 3),
                           _f(n["measured"]["mbit"], 1)]
                          for k, n in e2e["networks"].items() if k != "loopback"]), "",
                  f"![per-token latency breakdown]({PLOTS['latency']})", ""]

    pb = results.get("protect")
    if pb:
        lines += ["## 4. Protect: throughput and peak memory", "",
                  f"`{pb['command']}` on a synthetic LLaMA-shaped fp32 checkpoint ({pb['layers']} layers, "
                  f"{pb['tensors']} tensors, {pb['shards']} shard(s)).", "",
                  _table(["checkpoint", "seconds", "MB/s", "peak RSS", "bound (3 x largest tensor + 1.5 GB)",
                          "within bound"],
                         [[_bytes(pb["checkpoint_bytes"]), _f(pb["seconds"]), _f(pb["mb_per_s"], 1),
                           f"{_f(pb['peak_rss_gb'], 3)} GB", f"{_f(pb['rss_bound_gb'], 3)} GB",
                           _f(pb["within_bound"])]]), ""]

    mpc = results.get("mpc")
    if mpc:
        s, d, x = mpc["shape"], mpc["decode"], mpc["extrapolated"]

        def step_row(name: str, r: dict) -> list:
            return [name, f"{_f(r['mpc_seconds'] * 1e3, 1)} ms", ", ".join(f"{t * 1e3:.0f}" for t in
                                                                           r["mpc_seconds_all"]) + " ms",
                    f"{_f(r['plain_seconds'] * 1e3, 3)} ms", f"{_f(r['speedup'], 0)}x", _bytes(r["comm_bytes"]),
                    r["rounds"], f"{r['max_abs_error']:.2e}"]

        lines += ["## 5. Secure two-party computation baseline (CrypTen), per decoded token", "",
                  f"One LLaMA decoder block (d={s['d']}, {s['n_heads']} heads / {s['n_kv_heads']} KV heads, "
                  f"ffn {s['m']}) under {mpc['protocol']}, two processes, {mpc['threads']['mpc_per_party']} thread "
                  f"per party; the same block in plain torch on {mpc['threads']['plain']} thread(s). Decode (the "
                  f"headline, per token as in section 3): one new token attending to a secret-shared KV cache of "
                  f"{d['context']} tokens. Prefill (secondary): {s['T']} tokens at once. STIP's server runs the "
                  f"plain block (section 1: the same cost as the unprotected model).", "",
                  _table(["step", "CrypTen block (median)", "all runs", "plain block", "CrypTen / plain",
                          "communication", "rounds", "max abs error"],
                         [step_row(f"decode: 1 token, context {d['context']}", d),
                          step_row(f"prefill: {mpc['prefill']['tokens']} tokens", mpc["prefill"])]), "",
                  f"Whole model per decoded token, **extrapolated** ({x['note']}): CrypTen "
                  f"{_f(x['mpc_seconds_per_token'], 2)} s, {_bytes(x['comm_bytes_per_token'])} and "
                  f"{x['rounds_per_token']:,} rounds, vs {_f(x['plain_seconds_per_token'] * 1e3, 2)} ms plain.", ""]
        est = mpc.get("over_network_estimate")
        if est:
            lines += ["Decode over the simulated networks (an estimate, not a measurement: loopback time + rounds x "
                      "RTT + bytes / rate; both parties' traffic is counted once):", "",
                      _table(["network", "CrypTen block, per token", f"all {x['layers']} blocks, per token "
                              "(extrapolated)", "vs plain block"],
                             [[e["label"], f"{_f(e['block_s'], 3)} s", f"{_f(e['per_token_s'], 1)} s",
                               f"{_f(e['vs_plain'], 0)}x"] for e in est]), ""]
        lines += [f"![MPC vs plain]({PLOTS['mpc']})", ""]

    if results.get("scale"):
        lines += scale_markdown(results["scale"])

    lines += ["## Notes", "", *[f"- {n}" for n in results.get("notes", [])], ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plots


def plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    title_tail = "\n(quick smoke run: tiny model, few repeats)" if results["meta"]["quick"] else ""

    e2e = results.get("end_to_end")
    if e2e:
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
        fig.tight_layout()
        fig.savefig(out / PLOTS["latency"], dpi=120)
        plt.close(fig)
        written.append(PLOTS["latency"])

    sc = results.get("server_cost")
    if sc:
        rows = sc["rows"]
        labels = [_row_label(r).replace(" (", "\n(").replace(" T=", "\nT=") for r in rows]
        fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(rows) + 2), 4.5))
        series = [("ratio", "all repeats of all processes", "#4c72b0"),
                  ("ratio_per_process", "per-process medians", "#55a868")]
        _grouped_bars(ax, rows, series)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(0.98, color="#c44e52", ls="--", lw=1, label="target 0.98")
        lo = min([0.9] + [r[k]["p25"] for r in rows for k, _, _ in series])
        hi = max([1.05] + [r[k]["p75"] for r in rows for k, _, _ in series])
        ax.set_ylim(lo - 0.02, hi + 0.02)
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_ylabel("protected / plain throughput")
        ax.set_title("Engine level, in-process batched forward: protected vs plain (median, IQR)" + title_tail)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / PLOTS["ratio"], dpi=120)
        plt.close(fig)
        written.append(PLOTS["ratio"])

        fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
        for ax, phase in zip(axes, ("prefill", "decode")):
            sub = [r for r in rows if r["phase"] == phase]
            _grouped_bars(ax, sub, [("plain_tokens_per_s", "plain (token ids)", "#8c8c8c"),
                                    ("protected_tokens_per_s", "protected (embeddings)", "#4c72b0")])
            ax.set_xticks(range(len(sub)), [_row_label(r).split(" ", 1)[1] for r in sub], fontsize=8)
            ax.set_title(f"{phase} tokens/s")
            ax.legend(fontsize=8)
        fig.suptitle("Engine-level throughput, in-process batched forward (not what stip serve does today)"
                     + title_tail)
        fig.tight_layout()
        fig.savefig(out / PLOTS["throughput"], dpi=120)
        plt.close(fig)
        written.append(PLOTS["throughput"])

    cc = results.get("concurrent")
    if cc:
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
        fig.tight_layout()
        fig.savefig(out / PLOTS["concurrent"], dpi=120)
        plt.close(fig)
        written.append(PLOTS["concurrent"])

    mpc = results.get("mpc")
    if mpc:
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
        fig.tight_layout()
        fig.savefig(out / PLOTS["mpc"], dpi=120)
        plt.close(fig)
        written.append(PLOTS["mpc"])
    return written


# ------------------------------------------------------------------------------------------------ writing


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return None if x != x else round(x, 6)
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, Path):
        return str(x)
    return str(x)


def write(results: dict, out: Path, log=print) -> dict:
    """results.json, PNG plots, then results.md (which links the plots)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = []
    if "plots" not in results.get("skipped", {}):
        try:
            results["plots"] = plots(results, out)
        except ImportError as e:
            results.setdefault("skipped", {})["plots"] = f"{e}: pip install -e '.[bench]' (matplotlib)"
    results = _jsonable(results)
    for name, text in (("results.json", json.dumps(results, indent=2) + "\n"), ("results.md", markdown(results))):
        tmp = out / f".{name}.tmp"  # never a half-written file under the real name
        tmp.write_text(text)
        tmp.replace(out / name)
    log(f"wrote {out / 'results.md'}, {out / 'results.json'} and {len(results['plots'])} plots")
    return results
