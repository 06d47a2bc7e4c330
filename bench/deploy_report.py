"""deploy.json and deploy.md for `python -m bench.deploy`: the cells, the simulations named as such, the paper's
three settings beside ours, and issue 22's budgets against what was measured."""

from __future__ import annotations

import json
from pathlib import Path

from bench.report import _jsonable
from bench.report_format import num

# The paper's figures (STIP, its section 7 as ../shared/STIP.md summarises it): LLaMA2-7B decoding, server 4x A100.
PAPER = {
    "model": "LLaMA2-7B, server 4x NVIDIA A100",
    "settings": [
        {"setting": "full cloud (unprotected, no data owner in the loop)", "ms_per_token": 12, "ours": "loopback"},
        {"setting": "wired LAN", "ms_per_token": 30, "ours": "wired",
         "split": "31.7 ms: client 1.7 ms, cloud 11 ms, the rest communication"},
        {"setting": "wireless", "ms_per_token": 510, "ours": "wireless"},
    ],
    "devices": [
        {"device": "desktop PC, 8-core i7", "workload": "campus-security chatbot (GPT-2, LLaMA2)", "ours": "desktop"},
        {"device": "NVIDIA Orin board", "workload": "in-vehicle scene understanding (ViT, LLaVA)", "ours": "edge"},
        {"device": "MacBook Pro, 4-core i5", "workload": "chatbot (BERT, Mixtral)", "ours": "laptop"},
    ],
}
BUDGETS = {"client_ms": 0.3, "install_mb": 60.0, "cold_start_ms": 1000.0, "rss_mb": 150.0}


def _sim(row: dict, key: str, nd: int = 2) -> str:
    """A cell; on a slowed-down device the simulated figure first, the measured one in brackets."""
    if "simulated" in row and key in row["simulated"]:
        return f"{num(row['simulated'][key], nd)} ({num(row[key], nd)})"
    return num(row[key], nd)


def _rss(row: dict) -> str:
    """Peak resident MB, and at the end its anonymous and file-backed parts (shared libraries, mapped files)."""
    m = row.get("rss_mb") or {}
    parts = f"; anon {num(m['RssAnon'], 0)}, file {num(m['RssFile'], 0)}" if "RssAnon" in m and "RssFile" in m else ""
    return num(row["rss_peak_mb"], 1) + parts


def _cells(doc: dict) -> list[str]:
    s = doc["settings"]
    lines = [f"## Per decode token: SmolLM2-135M-Instruct, {s['tokens']} new tokens, greedy "
             f"(medians over {s['reps']} generation(s) per cell and downlink)", "",
             "ms per token = (total - first token) / decode steps; client, network and server split it: client is "
             "the light client's compute, server the compute `stip serve` reports (`--expose-timing`), network the "
             "round trip less that (the link, WebSocket framing, the server's event loop). Bytes are one decode "
             "step's WebSocket payloads. Cold start: the client process started -> ready for its first request "
             "(interpreter, `import stip`, bundle, tokenizer, the server's /v1/info), page cache warm. RSS: the "
             "client's peak (VmHWM); then, at the end, its anonymous and file-backed MB (shared libraries and mapped "
             "files are file-backed; the embedding table is read row by row, not mapped).", ""]
    if any("simulated" in r for r in doc["rows"]):
        lines += [f"Edge rows: **simulated** slowdown, the figure with the client's compute x "
                  f"{s['edge_slowdown']} (an assumed factor, see below) and, in brackets, what was measured on one "
                  f"core of this machine.", ""]
    lines += ["| device | network | downlink | ms/token | client | network | server | first token (ms) | "
              "up B/token | down B/token | cold start (ms) | client RSS (MB) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['device']} | {r['network']} | {r['downlink']} | {_sim(r, 'per_token_ms')} | "
                     f"{_sim(r, 'client_ms', 3)} | {num(r['network_ms'])} | {num(r['server_ms'])} | "
                     f"{_sim(r, 'ttft_ms', 1)} | {num(r['bytes_up'], 0)} | {num(r['bytes_down'], 0)} | "
                     f"{_sim(r, 'cold_start_ms', 0)} | {_rss(r)} |")
    return lines


def _setup(doc: dict) -> list[str]:
    lines = ["", "## What is simulated, and how", "", "| device profile | stands for (the paper's) | what runs here | "
             "the probe saw |", "|---|---|---|---|"]
    seen = {}
    for r in doc["rows"]:
        seen.setdefault(r["device"], r["limits"])
    for name, d in doc["devices"].items():
        lim = seen.get(name, {})
        space = f"{lim['address_space_gb']} GB" if lim.get("address_space_gb") else "unlimited"
        lines.append(f"| {name} | {d['stands_for']} | {d['label']} | cores {lim.get('cores')}, address space {space} |")
    t = doc["throttles"]
    lines += ["", f"Reduced clock: cpufreq {'at ' + t['cpufreq'] if t['cpufreq'] else 'absent'}"
              f"{' (writable)' if t.get('cpufreq_writable') else ''}, cpulimit "
              f"{t['cpulimit'] or 'not installed'} on this machine, so the edge board's slower core is simulated: "
              f"its client compute (per token, the prompt's embedding, the cold start) is multiplied by "
              f"{doc['settings']['edge_slowdown']} after a real run on one core with 2 GB. The factor is assumed "
              f"(`--edge-slowdown`), not measured on an Orin: `python -m bench.deploy_probe CLIENT_BUNDLE --offline` "
              f"on a real board, over the offline figure below, gives the factor to use.", "",
              "| network | configured | relay measured: RTT (ms) | Mbit/s |", "|---|---|---|---|"]
    for name, n in doc["networks"].items():
        m = n.get("measured") or {}
        lines.append(f"| {name} | {n['label']} | {num(m.get('rtt_ms'))} | {num(m.get('mbit'), 1)} |")
    lines += ["", "Networks are `bench.netsim` relays (a process between client and server adding delay and a rate "
              "limit each way; loss costs its TCP recovery time: one RTT, or max(2 RTT, 10 ms) for a tail segment; "
              "congestion control is not modelled). Loopback has no relay. Server: " + doc.get("server", "-") + "."]
    return lines


def _client(doc: dict) -> list[str]:
    yes = {True: "yes", False: "no", None: "-"}
    lines = ["", "## The client install and its compute", "", f"Client: {doc['client_python']}; torch imported by "
             f"the client: {yes[doc['client_imported_torch']]}; the same greedy tokens in every cell and downlink: "
             f"{yes[doc['same_tokens_everywhere']]}."]
    size = doc.get("client_install")
    if size:
        largest = ", ".join(f"{k} {v}" for k, v in list(size["largest_mb"].items())[:6])
        lines += ["", f"Installed size: **{size['total_mb']} MB** = site-packages {size['site_packages_mb']} MB "
                  f"({size['site_packages_without_pycache_mb']} MB without __pycache__) + stip's package "
                  f"{size['stip_package_mb']} MB. Largest (MB): {largest}."]
    offline = {}
    for r in doc["rows"]:
        offline.setdefault(r["device"], r)
    lines += ["", "Client compute per token with no server (`deploy_probe --offline`: pick from 64 top-k pairs, "
              "map through the key, detokenize, embed the next row; median of 300): " +
              "; ".join(f"{d} {_sim(r, 'offline_client_ms', 3)} ms" for d, r in offline.items()) + "."]
    return lines


def _paper(doc: dict) -> list[str]:
    by = {}
    for r in doc["rows"]:
        if r["downlink"] == "topk":
            by.setdefault(r["network"], []).append(r)
    lines = ["", f"## Beside the paper's three settings ({PAPER['model']})", "",
             "| the paper's setting | paper ms/token | ours | ours ms/token (top-k; client / network / server) |",
             "|---|---|---|---|"]
    for p in PAPER["settings"]:
        ours = "; ".join(f"{r['device']} {_sim(r, 'per_token_ms', 1)} ({_sim(r, 'client_ms', 2)} / "
                         f"{num(r['network_ms'], 1)} / {num(r['server_ms'], 1)})" for r in by.get(p["ours"], []))
        lines.append(f"| {p['setting']} | {p['ms_per_token']}{' (' + p['split'] + ')' if p.get('split') else ''} "
                     f"| {p['ours']} | {ours or 'not run'} |")
    lines += ["", "| the paper's data owner | its workload | our profile |", "|---|---|---|"]
    lines += [f"| {d['device']} | {d['workload']} | {d['ours']} |" for d in PAPER["devices"]]
    lines += ["", "Not like for like: the paper's server is 4 A100s running a 7B model (11 ms of cloud compute per "
              "token); ours is one CPU core running a 135M model. What carries over is the client's part and the "
              "network's: the paper's 1.7 ms of client work per token against our client column, and its wired "
              "and wireless overheads against our network column. Our networks are the issue's settings, not the "
              "paper's (which it does not give in this summary)."]
    return lines


def _table_name(t: dict) -> str:
    shape = f"{t['rows']} x {t['cols']} float16"
    return f"7B-shaped table ({shape}, synthetic)" if t.get("seven_b") else f"{shape} table (not 7B-shaped)"


def _table(doc: dict) -> list[str]:
    """The synthetic table's section: the per-token parts and the memory at each phase."""
    t = doc.get("table")
    if not t:
        return []
    w, pt = t["written"], t["per_token"]
    lines = ["", f"## A {_table_name(t)}: issue 22's 7B budgets", "",
             f"A client bundle written for the purpose (`bench.deploy_table`): a random {t['rows']} x {t['cols']} "
             f"float16 table stored as `stip protect` stores one (embedding-token.safetensors, read row by row by "
             f"the light client's loader), a random key, signed; the tokenizer borrowed from the SmolLM2 bundle "
             f"(49152 entries where LLaMA2 has 32000; {t['prompt_ids_folded']} of the prompt's {t['prompt_tokens']} "
             f"ids folded below the table's rows). The light venv runs it under {t['profile']} (the probe saw cores "
             f"{t['limits']['cores']}): `ClientBundle.load` (sha256 of every file included: {num(t['bundle_load_ms'], 0)}"
             f" ms; the tokenizer and chat template {num(t['tokenizer_load_ms'], 0)} ms), the prompt embedded, then "
             f"{t['touch']} decode steps, each on a row not touched before, through the client's own per-token code; "
             f"each step's reply is built, as the server builds it, before its clock starts.", "",
             "| part of a decode step | the client's code | median ms |", "|---|---|---|",
             f"| reply | `wire.decode_frame`, `replies.check_reply` ({t['k']} top-k pairs) | {num(pt['reply_ms'], 4)} |",
             f"| pick | `sdk.pick_token` (`plain_ids` through the key, `Sampler.from_topk`), `observe` | "
             f"{num(pt['pick_ms'], 4)} |",
             f"| detokenize | `Detokenizer.push`, `StopMatcher.push` | {num(pt['detokenize_ms'], 4)} |",
             f"| embed | `ClientBundle.embed`: the row read from the file (`os.preadv`), float32, permuted | "
             f"{num(pt['embed_ms'], 4)} |",
             f"| request | `wire.encode_frame` of the next decode request | {num(pt['request_ms'], 4)} |",
             f"| **total** | (p90 {num(pt['total_p90_ms'], 3)}, max {num(pt['total_max_ms'], 3)}) | "
             f"**{num(pt['total_ms'], 4)}** |", "",
             "| client process | RSS (MiB) | anonymous | file-backed |", "|---|---|---|---|"]
    names = {"start": "interpreter started", "imported": "`import stip`, `stip.client.sdk`",
             "bundle": "bundle loaded (sha256 checked, table opened)",
             "tokenizer": "tokenizer loaded, chat template rendered",
             "prompt": "prompt embedded", "after": f"after {t['touch']} steps ({t['touched_rows']} rows touched)"}
    for key, label in names.items():
        m = t["memory"][key]
        lines.append(f"| {label} | {num(m['VmRSS'], 1)} | {num(m['RssAnon'], 1)} | {num(m['RssFile'], 1)} |")
    lines += ["", f"Budget: the tokenizer's share ({num(t['tokenizer_mb'], 1)} MiB, what loading it added) + the "
              f"touched rows ({t['touched_rows']} x {t['cols'] * 2} bytes = {num(t['touched_rows_mb'], 1)} MiB) + "
              f"{num(t['slack_mb'], 0)} MiB = {num(t['rss_budget_mb'], 1)} MiB; measured {num(t['rss_mb'], 1)}, of "
              f"which the interpreter and the client's imports took {num(t['memory']['imported']['VmRSS'], 1)} MiB "
              f"before the bundle was opened. The "
              f"file-backed part grew by {num(t['rss_growth_file_mb'], 1)} MiB from the tokenizer on (code pages): "
              f"the table is read row by row (`os.preadv`), not mapped, so the "
              f"{num(t['touched_rows_mb'], 1)} MiB of rows touched are not kept resident; a mapping kept whole "
              f"page-cache folios around each row (`ClientBundle.load` reads the whole file for its sha256)."]
    return lines


def _budgets(doc: dict) -> list[str]:
    rows = [r for r in doc["rows"] if r["downlink"] == "topk"]
    one_core = [r for r in rows if r["device"] in ("laptop", "edge")]
    checks = []
    if one_core:
        worst = max(r["client_ms"] for r in one_core)
        checks.append(("client compute per token, SmolLM2, 1 core (top-k, measured)", worst, BUDGETS["client_ms"],
                       "ms"))
    if doc.get("client_install"):
        checks.append(("installed size of the client", doc["client_install"]["total_mb"], BUDGETS["install_mb"],
                       "MB"))
    if rows:
        checks.append(("cold start to the first request (worst cell, measured)",
                       max(r["cold_start_ms"] for r in rows), BUDGETS["cold_start_ms"], "ms"))
        checks.append(("client RSS, SmolLM2 (worst peak)", max(r["rss_peak_mb"] for r in rows), BUDGETS["rss_mb"],
                       "MB"))
    t = doc.get("table")
    if t:
        checks.append((f"client compute per token, {_table_name(t)}, 1 core (median of {t['touch']} new rows)",
                       t["per_token"]["total_ms"], t["budget_ms"], "ms"))
        checks.append((f"client RSS, {_table_name(t)}, after {t['touch']} rows (tokenizer + touched rows + "
                       f"{num(t['slack_mb'], 0)} MiB)", t["rss_mb"], t["rss_budget_mb"], "MiB"))
    lines = ["", "## Issue 22's budgets (on this machine)", "", "| budget | measured | at most | met |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {num(got, 3)} {unit} | {limit} {unit} | {num(got <= limit)} |"
              for name, got, limit, unit in checks]
    return lines


def markdown(doc: dict) -> str:
    m = doc["machine"]
    head = ["# The data owner's device and network (issue 22): simulations on one machine", ""]
    if doc.get("dirty"):
        head += ["**DIRTY TREE: uncommitted changes; not for committing.**", ""]
    if doc.get("quick"):
        head += ["**--quick: a smoke run (few tokens, one profile, one network); not for quoting.**", ""]
    head += ["Every device profile and every network here is **simulated** on one machine: cores by `taskset`, "
             "memory by an address-space limit, a slower core by a stated factor, links by a relay process.", "",
             f"Command: `{doc['command']}`; commit {(doc.get('commit') or '?')[:12]}; {m['cpu']}, {m['cores']} "
             f"cores, {m.get('memory_gb')} GB; load average {m['load_average_at_start']} at the start (a shared "
             f"machine: times are upper bounds); {doc['seconds']:.0f} s.", ""]
    body = _cells(doc) + _setup(doc) + _client(doc) + _paper(doc) + _table(doc) + _budgets(doc)
    return "\n".join(head + body) + "\n"


def write(doc: dict, out: Path) -> str:
    """deploy.json, then deploy.md (each written whole, then renamed); returns the markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = _jsonable(doc)
    text = markdown(doc)
    for name, body in (("deploy.json", json.dumps(doc, indent=2) + "\n"), ("deploy.md", text)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(body)
        tmp.replace(out / name)
    return text
