"""bench/audit_tee.py's output: the TEE worker's rows (one per attack per attacker level) as Markdown and JSON, with
the command, commit and machine, beside the round-trip server's paper-mode row where bench/results/audit has one."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import time
from pathlib import Path

import torch

ROUND_TRIP_TABLE = Path(__file__).resolve().parent / "results" / "audit" / "table.json"
RUN_FILES = ("stip", "bench/audit_tee.py", "bench/audit_tee_report.py", "bench/tee_extraction_model.py")  # dirty:
# any change here, untracked files included (the attacks, the parties it starts)
SHARE_UNITS = ("tokens", "key columns", "key entries", "rows", "codes")

# What the TEE worker gives each attack (the round-trip server gives it x p and the standard server bundle).
TEE_NOTES = {
    "known_plaintext": "pairs (x, received row): the worker receives h1 p = block0(x) p, not x p",
    "bundle_keys": "the TEE worker bundle: blocks 1..L-1 in p as in round trip; block 0 in secret bases, its norms "
                   "ones; a tied LM head zeros",
    "bundle_mixing": "needs the bundle's LM head: zeros for a tied model; an untied one is W A^-1 (A secret)",
    "gram_congruence": "T from the bundle's blocks 1..L-1; the decode matches h1 p T^-1 to the embedding table, but "
                       "h1 is block 0's output, not x",
    "key_invariants": "as gram_congruence for the path products; the LM-head profile needs the bundle's LM head",
    "ridge_inversion": "leaked (token, h1 p) pairs: a linear inverter from h1 p to the embedding",
    "arrowmatch": "weight directions from blocks 1..L-1 (and an untied LM head); the decode as gram_congruence's",
    "vocab_matching": "layer 0 is h1 p: candidates through the public block 0, compared with h1 p by sorted-L1; "
                      "\"inputs\" ranks h1 p against raw embedding rows",
    "invariants": "(a) norms and inner products of h1 p against embedding rows; (b) at layer 0 against candidates "
                  "run through block 0",
    "lm_head_matching": "a tied model's TEE worker bundle has no LM head (zeros); untied: skipped",
    "frequency": "h1 p depends on the context, so it is a per-token code only where the context repeats",
    "distance_correlation": "dCor between the plaintext embeddings and h1 p (and the deeper layers)",
    "finetune": "the frozen body is the TEE worker bundle's, whose block 0 is in secret bases with norms of ones",
    "tee_vocab_matching": "h1 p ranked against block 0's output for every token alone (sorted-L1; or cosine after "
                          "un-permuting with p from the bundle), then candidates through block 0 after the decoded "
                          "prefix, sorted-L1 (stip.audit.tee_vocab)",
}


def cell(attack: dict) -> str:
    """The recovery, or the figure that stands for it, or why there is none."""
    skipped = attack.get("skipped")
    if skipped:
        return "error" if skipped.startswith("error") else "n/a"
    r = attack.get("recovery")
    d = attack.get("details") or {}
    if r is not None:
        unit = str(attack.get("unit", ""))
        return f"{100 * r:.1f}%" if unit in SHARE_UNITS or unit.startswith(("key", "tokens")) else f"{r:.3f} {unit}"
    if attack["name"] == "distance_correlation":
        inputs = (d.get("per_layer") or {}).get("inputs", {})
        if inputs.get("dcor_bias_corrected") is not None:
            return f"dCor {inputs['dcor']:.2f} (corrected {inputs['dcor_bias_corrected']:.2f})"
        return f"dCor {inputs['dcor']:.2f}" if inputs.get("dcor") is not None else "-"
    if attack["name"] == "finetune":
        rows = d.get("rows") or {}
        body, scratch = rows.get("protected body", {}), rows.get("scratch", {})
        if "perplexity" in body and "perplexity" in scratch:
            return f"ppl {body['perplexity']:.0f} vs {scratch['perplexity']:.0f} scratch"
    return "-"


def remark(attack: dict) -> str:
    """Why it did not run, or the per-layer figures behind a layered attack's headline, or a budget note."""
    skipped = attack.get("skipped")
    if skipped:
        return skipped.splitlines()[0][:200]
    d = attack.get("details") or {}
    parts = []
    per_layer = d.get("per_layer")
    if isinstance(per_layer, dict):
        for layer, v in per_layer.items():
            if isinstance(v, dict) and v.get("recovery") is not None:
                parts.append(f"{layer} {100 * v['recovery']:.1f}%")
            elif isinstance(v, dict) and v.get("dcor_bias_corrected") is not None:
                parts.append(f"{layer} corrected dCor {v['dcor_bias_corrected']:.2f}")
    for pruning, v in (d.get("per_pruning") or {}).items():
        if v.get("recovery") is not None:
            parts.append(f"{pruning} pruning {100 * v['recovery']:.1f}% of {v['positions']} positions "
                         f"(true token in its top 64: {100 * v['recall'].get('64', 0):.0f}%)")
    if d.get("key_share") is not None:
        parts.append(f"p from the bundle {100 * d['key_share']:.1f}% right")
    floor = ((d.get("reference") or {}).get("independent") or {}).get("dcor_bias_corrected")
    if attack["name"] == "distance_correlation" and floor is not None:
        parts.append(f"independent samples (floor) {floor:.2f}")
    if d.get("over_budget"):
        parts.append(f"over budget ({d['over_budget']})")
    return "; ".join(parts)


def round_trip_rows(model: str, names: list[str]) -> dict:
    """The round-trip server's paper-mode cells from bench/results/audit/table.json (exact level: the audit table
    gives the attacker the public weights, which are the model's own), when it was run on the same model."""
    try:
        table = json.loads(ROUND_TRIP_TABLE.read_text())
    except (OSError, ValueError):
        return {}
    if str(table.get("model")) != str(model):
        return {}
    paper = next((row for row in table.get("rows", []) if row.get("mode") == "paper"), None)
    if paper is None:
        return {}
    attacks = {a["name"]: a for a in (paper.get("report") or {}).get("attacks", [])}
    return {"source": f"bench/results/audit/table.json (commit {str(table.get('commit'))[:12]})",
            "cells": {n: cell(attacks[n]) for n in names if n in attacks}}


def provenance(argv: list[str], seconds: float) -> dict:
    """The command, commit, machine and time of the run."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=30,
                                  cwd=Path(__file__).resolve().parent.parent).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"command": ("python -m bench.audit_tee " + shlex.join(argv)).strip(), "commit": git("rev-parse", "HEAD"),
            "dirty": git("status", "--porcelain", "--", *RUN_FILES) != "",
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "load_1min": None if load is None else round(load, 2), "python": platform.python_version(),
                        "torch": torch.__version__},
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(seconds, 1)}


def _rows(results: dict) -> list[str]:
    rt = results.get("round_trip") or {}
    lines = ["| attack | level | recovery | seconds | details | round-trip server (paper, exact) | what the worker "
             "gives it |", "|---|---|---|---|---|---|---|"]
    for name in results["attacks"]:
        for level in results["levels"]:
            lv = results["results"][level]
            attack = next((x for x in lv["attacks"] if x["name"] == name), None)
            if attack is None:
                attack = {"name": name, "skipped": lv.get("skipped") or "not run"}
            rt_cell = (rt.get("cells") or {}).get(name, "-") if level == "exact" else ""
            lines.append(f"| {name} | {level} | {cell(attack)} | {attack.get('seconds', 0):.0f} | "
                         f"{remark(attack).replace('|', '/')} | {rt_cell} | {TEE_NOTES.get(name, '')} |")
    return lines


def markdown(results: dict) -> str:
    p, t = results["provenance"], results["traffic"]
    m = p["machine"]
    head = [
        f"# The TEE worker's row: {results['model']}" + (" (DIRTY TREE: not for committing)" if p["dirty"] else ""),
        "",
        f"Command: `{p['command']}`; commit {p['commit'] or '?'}; {m['cpu']}, {m['cores']} cores, load "
        f"{m['load_1min']}; {p['utc']}; {p['seconds']:.0f} s in all (protect {results['protect_s']:.0f} s, "
        f"capture {t['seconds']:.0f} s).",
        "",
        f"Traffic: {t['requests']} prompts of {results['sizes']['prompt_tokens']} tokens (the audit's `prompts` "
        f"corpus) plus {results['sizes']['generate']} decode step(s) each, through TeeClient -> `stip enclave` -> "
        f"`stip serve --tee-worker --capture` on loopback; {t['observations']} steps, {t['rows']} rows of `h1 p`; "
        f"hidden states after layers {t['capture_layers']} (layer 0 is `h1 p` as received); padded linear rows "
        f"{t['offload_rows']}.",
        "",
        "Levels: " + "; ".join(f"**{lv}**: {results['results'][lv]['reference'] or results['results'][lv]['skipped']}"
                               for lv in results["levels"]) + ".",
        "",
        "Recovery: share of tokens (or key entries) the attack gets right, scored by the auditor (the ids sent; the "
        "keys from DIR/developer and DIR/client). n/a: the attack does not apply or lacks what it needs (the details "
        "say why); error: it failed on this input (its traceback is in the JSON).",
        "",
    ]
    lines = head + _rows(results)
    off = results.get("offload_view") or {}
    if off.get("attacks"):
        lines += ["", f"## The padded rows (level {off.get('level')}): `{off['group']}`", "",
                  "The attacks that read traffic, on the masked padded rows `A (x + r)` the worker received for block "
                  "0's first linear group, as if they were the inputs (pads fresh per query, 2^20 x the row's RMS).",
                  "",
                  "| attack | recovery | seconds | details |", "|---|---|---|---|"]
        lines += [f"| {x['name']} | {cell(x)} | {x.get('seconds', 0):.0f} | {remark(x).replace('|', '/')} |"
                  for x in off["attacks"]]
    if results.get("round_trip"):
        lines += ["", f"Round-trip column: {results['round_trip']['source']}, the paper-mode row."]
    return "\n".join(lines) + "\n"


def write(results: dict, out: Path, argv: list[str], seconds: float) -> list[Path]:
    results["provenance"] = provenance(argv, seconds)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "tee_worker.json", out / "tee_worker.md"]
    paths[0].write_text(json.dumps(results, indent=1, default=lambda v: v.tolist() if hasattr(v, "tolist")
                                   else str(v)) + "\n")
    paths[1].write_text(markdown(results))
    return paths
