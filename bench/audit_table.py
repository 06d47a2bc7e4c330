"""The README's privacy table: every protection mode against every `stip audit` attack, with its accuracy cost.

    python -m bench.audit_table        # SmolLM2: paper, mix, all, all+noise=0.01, all+noise=0.3
    python -m bench.audit_table --modes paper,all+noise=0.01 --quick --model DIR --out /tmp/x     # a tiny model
    python -m bench.audit_table --model ~/.cache/stip/smollm2-finetune --base smollm2 --levels none,base,exact \
        --out bench/results/audit-levels     # the fine-tune (python -m bench.finetune) at three attacker levels

For each mode (`paper` = the default scheme; otherwise `+`-joined `stip protect --harden` options and `noise=SIGMA`,
or `aloepri[:KEY=VALUE,...]` for AloePri's server-decode bundles: bench.audit_modes) it protects the model into a
temporary folder, runs `stip.audit.run.run_audit` on it (a real capturing `stip serve`, the real client) at each
attacker level asked (`--levels`: none holds no weights, base holds `--base`, the public model `--model` was
fine-tuned from, exact holds `--model` itself; default exact), and, on that same server after the audit's requests,
measures what the protection costs: each held-out window is sent as a user sends it (the client's embedding, its
noise where the mode adds it, one all-positions prefill with the full-logits downlink; a server-decode bundle's
window is scored by the server, `stip.Client.score`) and compared with `--model`'s own plain logits: top-1
agreement, and perplexity on the held-out text. A mode whose options `stip protect` does not know is skipped,
saying so.

Writes OUT/table.md and OUT/table.json, and each mode's full report in OUT/<mode>/. A run on a tree with
uncommitted changes is marked DIRTY TREE (not for committing).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.audit_modes import parse_mode, protect_mode, score_quality, scored_by_client, slug, split_modes  # noqa: F401

OUT = Path("bench/results/audit")
MODES = "paper,mix,all,all+noise=0.01,all+noise=0.3"
FULL = {"heldout_tokens": 512, "window": 128}
QUICK = {"heldout_tokens": 64, "window": 32}

# Published numbers, beside ours (cited as the papers give them).
PUBLISHED = [
    ("STIP paper's scheme (permutations), vocabulary matching", "Hidden No More, arXiv 2505.18332",
     "97.6-100% of tokens recovered on Llama-3.1-8B and Gemma-2-2B"),
    ("AloePri", "arXiv 2603.01499", "under 5% token recovery at 0-3.5% accuracy loss"),
    ("STIP paper, Table V (fine-tuning attack), loss / accuracy / perplexity", "STIP, NDSS 2026",
     "original 3.42 / 0.38 / 31; transformed 6.82 / 0.15 / 919; scratch 6.29 / 0.18 / 538; "
     "adapter 9.54 / 0.11 / 13963"),
]


def quality(client_dir: Path, url: str, token: str, plain, ids: torch.Tensor, window: int) -> dict:
    """Top-1 agreement and perplexity, protected (through the real server, as a user) against plain."""
    from stip.client.bundle import ClientBundle
    from stip.client.transport import Connection, Downlink

    bundle = ClientBundle.load(client_dir)
    conn = Connection(url, token=token)
    agree = positions = 0
    nll_plain = nll_prot = 0.0
    predictions = 0
    max_diff = 0.0
    for start in range(0, ids.numel() - 1, window):
        w = ids[start:start + window]
        if w.numel() < 2:
            break
        with conn.open_session() as s:
            got = s.prefill(bundle.embed(w), positions="all", downlink=Downlink("logits"))
        prot = bundle.plain_logits(got.logits.float())
        with torch.no_grad():
            ref = plain(input_ids=w[None]).logits[0].float()
        agree += int((prot.argmax(-1) == ref.argmax(-1)).sum())
        positions += int(w.numel())
        nll_prot += float(torch.nn.functional.cross_entropy(prot[:-1], w[1:], reduction="sum"))
        nll_plain += float(torch.nn.functional.cross_entropy(ref[:-1], w[1:], reduction="sum"))
        predictions += int(w.numel()) - 1
        max_diff = max(max_diff, float((prot - ref).abs().max()))
    ppl_plain, ppl_prot = math.exp(nll_plain / predictions), math.exp(nll_prot / predictions)
    return {"top1_agreement": agree / positions, "positions": positions, "ppl_plain": ppl_plain,
            "ppl_protected": ppl_prot, "ppl_change": ppl_prot / ppl_plain - 1, "max_logit_diff": max_diff,
            "path": "real stip serve + client (all-positions prefill, full-logits downlink, the client's own "
                    "embedding and noise)"}


def cell(attack: dict) -> str:
    """One table cell: the recovery, or the figure that stands for it, or why there is none."""
    from stip.audit.report import fmt_recovery

    skipped = attack.get("skipped")
    if skipped:
        return "error" if skipped.startswith("error") else "stopped" if skipped.startswith("stopped") else "n/a"
    if attack.get("recovery") is not None:
        return fmt_recovery(attack)
    d = attack.get("details") or {}
    if attack["name"] == "distance_correlation":
        dcor = (d.get("per_layer") or {}).get("inputs", {}).get("dcor")
        return f"dCor {dcor:.2f}" if dcor is not None else "-"
    if attack["name"] == "finetune":
        rows = d.get("rows") or {}
        body, scratch = rows.get("protected body", {}), rows.get("scratch", {})
        if "perplexity" in body and "perplexity" in scratch:
            return f"ppl {body['perplexity']:.0f} vs {scratch['perplexity']:.0f} scratch"
    return "-"


def _header(table: dict, names: list[str], several: bool) -> list[str]:
    titles = [a.replace("_", " ") for a in names]
    lines = [f"# STIP privacy audit: {table['model']}", ""]
    if table["dirty"]:
        lines += ["**DIRTY TREE - not for committing**: run with uncommitted changes.", ""]
    held = ("the server bundle, what the server received, public text and, by attacker level: none, no weights "
            f"(a public LM with the same tokenizer where there is one); base, {table.get('base') or 'the public base'}"
            f" (the model was fine-tuned from it); exact, the model's own weights" if several else
            "the server bundle, what the server received, public text and the public weights")
    lines += [f"Command: `{table['command']}`; commit {table['commit'] or 'unknown'}; {table['machine']['cpu']}, "
              f"{table['machine']['cores']} cores; {table['seconds']:.0f} s in all"
              + (" (quick settings)" if table["quick"] else "") + ".", "",
              f"Recovery rates: share of tokens (or key entries) each attack gets right; the attacker holds {held}. "
              "Top-1 agreement and perplexity: held-out text through the real server and client, against the "
              "model's own plain weights.", "",
              "| mode | " + ("attacker | " if several else "") + " | ".join(titles) + " | top-1 agreement | "
              "perplexity (plain -> protected) |",
              "|---" * (len(names) + 3 + several) + "|"]
    return lines


def markdown(table: dict) -> str:
    """The table: a row per mode, or per mode and attacker level when there are several levels."""
    from stip.audit.report import by_attack

    names = table["attacks"]
    levels = table.get("levels") or ["exact"]
    several = len(levels) > 1
    lines = _header(table, names, several)
    for row in table["rows"]:
        if row.get("skipped"):
            lines.append(f"| {row['mode']} | " + "- | " * several + " | ".join("-" for _ in names)
                         + f" | - | skipped: {row['skipped']} |")
            continue
        per_attack = by_attack(row["report"])
        q = row["quality"]
        for i, level in enumerate(levels):
            got = {name: per_level.get(level, per_level.get(None)) for name, per_level in per_attack.items()}
            quality = (f"{100 * q['top1_agreement']:.1f}% | {q['ppl_plain']:.2f} -> {q['ppl_protected']:.2f} "
                       f"({100 * q['ppl_change']:+.1f}%)") if i == 0 else "\" | \""
            lines.append(f"| {row['mode']} | " + (f"{level} | " if several else "")
                         + " | ".join(cell(got[a]) if got.get(a) else "-" for a in names) + f" | {quality} |")
    lines += ["", "n/a: the attack does not apply (e.g. LM-head matching on an untied model) or lacks what it needs "
              "(weights, at level none); each mode's report (`<mode>/report.md`) says why, with every attack's "
              "details and plots.", "", "## Published numbers", "", "| scheme / attack | source | reported |",
              "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in PUBLISHED]
    return "\n".join(lines) + "\n"


def run(model: str, modes: list[str], out: Path, quick: bool, attacks: str | None, heldout_tokens: int,
        window: int, prompts: int | None, prompt_tokens: int | None, keep_capture: bool = False,
        command: str = "", levels: list[str] | None = None, base: str | None = None, public_lm: str = "auto",
        settings: dict | None = None, budget_s: float | None = None, resume: bool = False) -> dict:
    """Every mode of `model`, audited at every attacker level (default exact), with its accuracy cost. The table
    is written after each mode (`complete` false until the last), so a long run that is stopped keeps its rows;
    `resume` keeps the rows of an earlier run of the same model, levels and base and audits only the other modes."""
    from stip.audit.attacks import ATTACKS
    from stip.models import load_plain_model

    from bench.report import git, machine_info

    t0 = time.perf_counter()
    run_state = {"commit": git("rev-parse", "HEAD"),  # at start
                 "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    levels = levels or ["exact"]
    names = [a.strip() for a in attacks.split(",")] if attacks else list(ATTACKS)
    table = {"model": str(model), "modes": modes, "levels": levels, "base": base, "attacks": names, "quick": quick,
             "rows": [], "heldout_tokens": heldout_tokens, "window": window, "published": PUBLISHED,
             "settings": settings, "budget_s": budget_s, "prompts": prompts, "prompt_tokens": prompt_tokens,
             "command": command, **run_state,
             "machine": machine_info(), "seconds": 0.0, "complete": False}
    kept = earlier_rows(out, table) if resume else {}
    plain, plain_tok = load_plain_model(model)
    plain = plain.eval()  # float32 already (GGUF models refuse .float())
    weights = _attacker_models(levels, base, public_lm, plain, plain_tok)
    with tempfile.TemporaryDirectory(prefix="stip-audit-table-") as tmp:
        for mode in modes:
            if mode in kept:
                print(f"[audit_table] mode {mode}: kept from the earlier run (--resume)", flush=True)
                row = kept[mode]
            else:
                row = {**audit_mode(model, mode, Path(tmp), out, plain, weights, table, attacks, keep_capture,
                                    prompts, prompt_tokens), "run": run_state}
            table["rows"].append(row)
            table["seconds"] = time.perf_counter() - t0
            write(table, out)
    table["complete"] = True
    table["dirty"] = any(r.get("run", run_state)["dirty"] for r in table["rows"])
    write(table, out)
    return table


def earlier_rows(out: Path, table: dict) -> dict:
    """The audited rows of OUT/table.json from a run with the same model, levels, base and sizes: {mode: row}."""
    path = out / "table.json"
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    same = ("model", "levels", "base", "quick", "heldout_tokens", "window", "settings", "budget_s", "prompts",
            "prompt_tokens")
    if any(old.get(k) != table[k] for k in same):
        raise SystemExit(f"error: --resume: {path} is from another run ({', '.join(same)} must match)")
    return {r["mode"]: {**r, "run": r.get("run") or {"commit": old["commit"], "dirty": old["dirty"]}}
            for r in old["rows"] if not r.get("skipped")}


def audit_mode(model: str, mode: str, tmp: Path, out: Path, plain, weights: dict, table: dict,
               attacks: str | None, keep_capture: bool, prompts: int | None, prompt_tokens: int | None) -> dict:
    """One mode: protect, audit through a real capturing server, and measure its accuracy cost while it serves."""
    from stip.audit.corpus import token_ids
    from stip.audit.run import CharTokenizer, run_audit
    from stip.client.bundle import ClientBundle

    bundle = tmp / slug(mode)
    print(f"[audit_table] mode {mode}: protecting {model}", flush=True)
    why = protect_mode(model, bundle, mode)
    if why:
        print(f"[audit_table] mode {mode} skipped: {why}", flush=True)
        return {"mode": mode, "skipped": why}
    client = ClientBundle.load(bundle / "client")
    tok = client.tokenizer if client.has_tokenizer else CharTokenizer(client.vocab_size)
    heldout = token_ids(tok, "heldout", table["heldout_tokens"])
    measured: dict = {}
    how = score_quality if scored_by_client(client) else quality

    def measure(url, token):
        measured.update(how(bundle / "client", url, token, plain, heldout, table["window"]))

    report = run_audit(bundle, out / slug(mode), attacks=attacks, quick=table["quick"], prompts=prompts,
                       prompt_tokens=prompt_tokens, force=True, while_serving=measure,
                       keep_capture=keep_capture, levels=table["levels"], settings=table["settings"],
                       budget_s=table["budget_s"], **weights)
    print(f"[audit_table] mode {mode}: top-1 {measured['top1_agreement']:.3f}, ppl change "
          f"{measured['ppl_change']:+.4f}, audit {report['seconds']:.0f} s", flush=True)
    return {"mode": mode, "quality": measured, "report": report}


def _attacker_models(levels: list[str], base: str | None, public_lm: str, plain, plain_tok) -> dict:
    """run_audit's weight arguments, each model loaded once for every mode: the base (level base), the model's own
    weights (level exact) and the public LM (level none)."""
    from stip.audit.levels import Models, public_language_model

    if "base" in levels and not base:
        raise SystemExit("error: level base needs --base MODEL: the public model --model was fine-tuned from")
    if base and "base" not in levels:
        raise SystemExit("error: --base is the weights of level base; add base to --levels")
    models = Models()
    kw: dict = {"exact": plain if "exact" in levels else None, "public_lm": None}
    if "base" in levels:
        kw["reference"], _ = models.get(base)
    vocab = int(plain.get_input_embeddings().weight.shape[0])
    kw["public_lm"], note = public_language_model(public_lm, levels, plain_tok, plain_tok is not None, vocab, models)
    print(f"[audit_table] levels {', '.join(levels)}; public LM: {note}", flush=True)
    return kw


def write(table: dict, out: Path) -> None:
    from stip.common.files import write_bytes_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / "table.json", (json.dumps(table, indent=2, default=str) + "\n").encode())
    write_bytes_atomic(out / "table.md", markdown(table).encode())


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m bench.audit_table", description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default=MODES, help=f"comma-separated modes (default {MODES}; "
                    "AloePri: aloepri or aloepri:KEY=VALUE,... as stip protect --aloepri takes them)")
    ap.add_argument("--model", default="smollm2", help="smollm2 (default) or a Hugging Face model folder")
    ap.add_argument("--quick", action="store_true", help="small budgets (tests, smoke runs)")
    ap.add_argument("--attacks", help="comma-separated attacks (default: all)")
    ap.add_argument("--heldout-tokens", type=int, help="held-out tokens for agreement and perplexity (default 512)")
    ap.add_argument("--window", type=int, help="tokens per held-out request (default 128)")
    ap.add_argument("--prompts", type=int, help="audit requests per mode (run_audit's default)")
    ap.add_argument("--prompt-tokens", type=int, help="tokens per audit request")
    ap.add_argument("--keep-capture", action="store_true", help="keep each mode's raw capture in OUT/<mode>/capture")
    ap.add_argument("--levels", default="exact", help="attacker levels, comma-separated: none, base, exact "
                    "(default exact: the attacker holds --model's weights)")
    ap.add_argument("--base", help="the public model --model was fine-tuned from: level base's weights")
    ap.add_argument("--public-lm", default="auto", help="level none's public LM (auto: smollm2 when the tokenizer "
                    "matches; none; or a name/folder)")
    ap.add_argument("--settings", type=json.loads, help="per-attack knobs as JSON, run_audit's settings (e.g. "
                    "'{\"key_invariants\": {\"budget_s\": 600}}')")
    ap.add_argument("--budget", type=float, help="seconds after which each attack is stopped (0: none; default "
                    "run_audit's)")
    ap.add_argument("--resume", action="store_true", help="keep the modes OUT/table.json already has (from a run "
                    "with the same model, levels, base and sizes; each row records its commit) and audit the rest")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    sizes = dict(QUICK if a.quick else FULL)
    if a.heldout_tokens:
        sizes["heldout_tokens"] = a.heldout_tokens
    if a.window:
        sizes["window"] = a.window
    modes = split_modes(a.modes)
    from stip.audit.levels import parse_levels
    from stip.errors import StipError

    try:
        levels = parse_levels(a.levels)
    except StipError as e:
        raise SystemExit(f"error: {e}") from None
    table = run(a.model, modes, a.out, a.quick, a.attacks, sizes["heldout_tokens"], sizes["window"], a.prompts,
                a.prompt_tokens, a.keep_capture, shlex.join(["python", "-m", "bench.audit_table", *argv]), levels,
                a.base, a.public_lm, a.settings, a.budget, a.resume)
    print(markdown(table))
    return table


if __name__ == "__main__":
    main()
