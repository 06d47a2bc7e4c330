"""The TEE extraction experiment's written results: tee_extraction.json, a Markdown table and three plots, with
the command, commit and machine that made them."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import time
from pathlib import Path

import torch

LABELS = {"plain": "(a) plain x p", "fixed": "(b) fixed x p D", "fresh-gauss": "(c) fresh pad x p + r (gaussian)",
          "fresh-gauss-2^20": "(c2) fresh pad x p + 2^20 rms(x) z (the enclave's before issue 23)",
          "fresh-gauss-const": "(c3) fresh pad x p + 2^20 B z, B a per-layer constant (the enclave's)",
          "fresh-field": "(c') fresh one-time pad mod 2^32",
          "split": "(d) pre-LN split h1 p, worker's block 0 in secret bases (distilled)",
          "split-known-block0": "(d') old design: block 0 in the basis of h1 p at the worker"}


def provenance(argv: list[str], seconds: float) -> dict:
    """The command, commit, machine and time of the run, recorded in the JSON."""
    def git(*a):
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return dict(command=("python -m bench.tee_extraction " + shlex.join(argv)).strip(), commit=git("rev-parse", "HEAD"),
                tree_clean=git("status", "--porcelain", "--", ":/bench/tee_extraction*.py", ":/stip") == "",
                machine=dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                             cpus=os.cpu_count(), torch=torch.__version__, torch_threads=torch.get_num_threads()),
                utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), wall_s=round(seconds, 1))


def plot(results: dict, out: Path) -> list[Path]:
    """R^2, top-1 agreement and token recovery against the number of queries, one line per condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for metric, ylabel, name in (("r2", "R^2 of the worker's input, held out", "tee_extraction_fit.png"),
                                 ("top1", "top-1 agreement with the true model", "tee_extraction_top1.png"),
                                 ("recovery", "token recovery from one observation", "tee_extraction_recovery.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for cond, rows in results["conditions"].items():
            if metric in rows[0]:
                line, = ax.plot([r["n"] for r in rows], [r[metric] for r in rows], marker="o", label=LABELS[cond])
                if metric == "recovery":
                    ax.plot([r["n"] for r in rows], [r["recovery_norm"] for r in rows], marker="x", ls="--",
                            c=line.get_color(), label=LABELS[cond] + ", by norm")
        if metric == "top1":
            ax.axhline(results["baselines"]["top1_no_information"], ls=":", c="grey", label="no information")
        if metric == "recovery":
            ax.axhline(results["baselines"]["recovery_chance"], ls=":", c="grey", label="chance 1/V'")
        ax.set_xscale("log")
        ax.set_xlabel("queries N (prompts of %d tokens)" % results["settings"]["seq_len"])
        ax.set_ylabel(ylabel)
        ax.set_title(f"{results['model']['name']}: {ylabel}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def markdown(results: dict) -> str:
    """One table: every condition at every N."""
    m, b, prov = results["model"], results["baselines"], results["provenance"]
    lines = [f"# TEE extraction experiment: {m['name']} ({m['type']}, hidden {m['hidden']}, {m['layers']} layers, "
             f"prompts from {m['sub_vocab']} of {m['vocab']} tokens)", "",
             f"`{prov['command']}` at {prov['commit'][:12]} on {prov['machine']['cpus']} CPUs, "
             f"{prov['wall_s']} s. No information: top-1 agreement {b['top1_no_information']:.3f}; "
             f"token recovery chance {b['recovery_chance']:.4f}.", "",
             "| condition | N | tokens | R^2 | cosine | token recovery (nearest row) | (by norm) | top-1 agreement |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for cond, rows in results["conditions"].items():
        for r in rows:
            rec = f"{r['recovery']:.3f} | {r['recovery_norm']:.3f}" if "recovery" in r else "- | -"
            lines.append(f"| {LABELS[cond]} | {r['n']} | {r['tokens']} | {r['r2']:.3f} | {r['cosine']:.3f} | {rec} "
                         f"| {r['top1']:.3f} |")
    return "\n".join(lines) + "\n"


def write(results: dict, out: Path) -> list[Path]:
    """JSON, markdown and plots, each written whole (temp file, then rename)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in (("tee_extraction.json", json.dumps(results, indent=2) + "\n"),
                       ("tee_extraction.md", markdown(results))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)
        paths.append(out / name)
    return paths + plot(results, out)
