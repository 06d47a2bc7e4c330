"""Commands that run all three parties on this machine: the demo, the benchmark and the audit."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from stip.cli.app import app


@app.command()
def demo(
    prompt: str = typer.Option("What is the capital of France? Answer in one sentence.", "--prompt", "-p"),
    max_tokens: int = typer.Option(48),
    cache: Path = typer.Option(Path.home() / ".cache" / "stip", help="where the protected default model is kept"),
):
    """All three parties on this machine, on the default model (SmolLM2-135M-Instruct)."""
    from stip.demo import run_demo

    ok = run_demo(prompt=prompt, max_tokens=max_tokens, cache=cache)
    raise typer.Exit(0 if ok else 1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    quick: bool = typer.Option(False, help="a small smoke run (CI)"),
    out: Path = typer.Option(Path("bench/results"), help="where results.md, results.json and plots go"),
    part: Optional[list[str]] = typer.Option(None, "--part", help="run only this part (repeat it): server_cost, "
                                             "concurrent, end_to_end, protect, mpc, scale (the full run leaves "
                                             "out concurrent: scale covers it)"),
):
    """Measure STIP against the plain model and against secure two-party computation: runs `python -m bench` in
    this git checkout (the suite lives in its bench/ folder); other options (the scale part's) pass through."""
    from stip.bench import run_bench

    args = [*(["--quick"] if quick else []), "--out", str(out), *[a for p in part or [] for a in ("--part", p)]]
    rc = run_bench([*args, *ctx.args])
    if rc:
        sys.exit(rc)


@app.command()
def audit(
    bundle: Path = typer.Argument(..., help="the folder `stip protect MODEL --out DIR` wrote (server/, client/)"),
    out: Path = typer.Option(..., "--out", "-o", help="report folder: report.md, report.json, plots"),
    attacker: Optional[str] = typer.Option(None, help="what the attacker knows: none (no weights: a model trained "
                                           "from scratch), base (the public base of a fine-tune: --reference), exact "
                                           "(its plaintext weights), or a comma list run on one capture (default: "
                                           "exact with --reference or --exact, else none)"),
    reference: Optional[str] = typer.Option(None, help="the weights the attacker holds: smollm2 or a Hugging Face "
                                            "folder; the base at level base, else the exact weights (default: none; "
                                            "attacks that need them are skipped)"),
    exact: Optional[str] = typer.Option(None, help="the protected model's own plaintext weights, for level exact "
                                        "when --reference is the base"),
    public_lm: str = typer.Option("auto", help="a public language model with the same tokenizer, for deciphering "
                                  "(auto: smollm2 at level none when the tokenizer matches; none; or a name/folder)"),
    attacks: Optional[str] = typer.Option(None, help="comma-separated attacks to run (default: all)"),
    prompts: Optional[int] = typer.Option(None, help="requests to send (default 16; --quick 4)"),
    prompt_tokens: Optional[int] = typer.Option(None, help="tokens per request (default 32; --quick 16)"),
    capture_layers: Optional[str] = typer.Option(None, help="decoder layers whose output the server records "
                                                 "(default: first, middle, last)"),
    budget: Optional[float] = typer.Option(None, help="seconds after which each attack is stopped (default 150; "
                                           "--quick 60; 0: no limit)"),
    quick: bool = typer.Option(False, help="small budgets (a smoke run)"),
    force: bool = typer.Option(False, help="replace a non-empty report folder"),
    keep_capture: bool = typer.Option(False, help="also keep the raw capture in OUT/capture"),
    seed: int = typer.Option(0),
):
    """Attack a protected model the way its server could, and report what each attack recovers (docs/audit.md)."""
    from stip.audit.report import by_attack, fmt_recovery, status
    from stip.audit.run import run_audit

    report = run_audit(bundle, out, reference=reference, attacks=attacks, prompts=prompts,
                       prompt_tokens=prompt_tokens, capture_layers=capture_layers, quick=quick, force=force,
                       keep_capture=keep_capture, seed=seed, levels=attacker, exact=exact, public_lm=public_lm,
                       budget_s=budget)
    levels = report["levels"]
    typer.echo(f"audit of {bundle} (mode {report['mode']}, attacker level {', '.join(levels)}), "
               f"{report['seconds']:.0f} s:")
    if len(levels) > 1:
        typer.echo(f"  {'':<22} " + " ".join(f"{lv:>8}" for lv in levels))
    for name, per_level in by_attack(report).items():
        cells = " ".join(f"{fmt_recovery(per_level[lv]):>8}" for lv in levels if lv in per_level)
        notes = "; ".join(f"{lv}: {status(a)}" if len(levels) > 1 else status(a)
                          for lv, a in per_level.items() if status(a))
        typer.echo(f"  {name:<22} {cells}  {next(iter(per_level.values())).get('unit', '')}  {notes}")
    typer.echo(f"report: {out / 'report.md'}")
