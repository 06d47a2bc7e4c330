"""The TEE worker, measured: every `stip audit` attack on what a real TEE worker receives.

    python -m bench.audit_tee                          # SmolLM2-135M-Instruct; bench/results/audit/tee_worker.{md,json}
    python -m bench.audit_tee --quick --out /tmp/x     # a tiny random LLaMA, minutes: the test suite's run

It protects the model with `stip protect --tee` into a temporary folder, plays users through the real TEE path on
loopback (`stip.audit.tee_capture`: TeeClient -> a real `stip enclave` -> a real capturing `stip serve --tee-worker`)
with the audit's prompts (`stip.audit.corpus`, the `prompts` part), and runs every attack of `stip.audit.attacks` on
what the worker received: `h1 p` (block 0's output) as the observed inputs, the body's hidden states after the
captured layers, layer 0 being `h1 p` itself (so vocabulary matching and invariant features at layer 0 run the
candidates through the public block 0 and compare them with `h1 p`); and, after them, the TEE worker's own variant
of vocabulary matching (`stip.audit.tee_vocab`: candidates pruned by a table of block 0's outputs rather than by raw
embedding rows, which `h1 p` is far from). Each attack runs at each attacker level:

- exact: the attacker holds the protected model's own plain weights (a published model served as is);
- base: it holds a public base the model was fine-tuned from (`--base MODEL`; or `--base-noise REL`, a stand-in: the
  plain weights plus Gaussian noise of REL times each tensor's standard deviation); skipped when neither is given;
- none: no weights (the public text and the worker's bundle only).

Besides, at the strongest level run (exact where it is), the attacks that read traffic run on a second view: the
masked padded rows the worker received for block 0's first linear group (`A (x + r)`, the pad fresh per query), as
if they were the inputs. An attack that cannot take a TEE worker bundle (it loads the bundle as a round-trip server
does) is reported as not applying, with the reason.
Writes OUT/tee_worker.md and OUT/tee_worker.json (the command, commit, machine); a run on a tree with uncommitted
changes to the files it runs is marked DIRTY TREE.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.audit_tee_report import round_trip_rows, write

OUT = Path(__file__).resolve().parent / "results" / "audit"
LEVELS = ("exact", "base", "none")
FULL = {"prompts": 8, "prompt_tokens": 32, "generate": 1, "public_tokens": 100_000, "heldout_tokens": 2000}
QUICK = {"prompts": 4, "prompt_tokens": 16, "generate": 1, "public_tokens": 20_000, "heldout_tokens": 1000}
QUICK_BASE_NOISE = 0.05  # --quick without --base: a stand-in base, so the level runs
EXTRA = {"tee_vocab_matching": "stip.audit.tee_vocab"}  # attacks for the TEE worker, run after the registry's
NO_TRAFFIC = ("bundle_keys", "finetune")  # read the bundle or public text only: the offload view adds nothing
# (nor EXTRA's tee_vocab_matching: its table and decode are built for h1 p, not for padded rows)
TEE_BUNDLE_REFUSED = ("cannot apply: it loads the server bundle as a round-trip server does, and a TEE worker bundle's "
                      "block 0 is in the enclave's secret bases (no block 0 to run in the basis of h1 p); the TEE "
                      "analogue, distilling block 0 from (prompt, h1 p) pairs, is bench/tee_extraction.py's row (d)")


def tiny_model(folder: Path, seed: int) -> Path:
    """The quick run's model: bench.tee_extraction_model's tiny random LLaMA, saved as a Hugging Face folder."""
    from bench.tee_extraction_model import tiny_llama

    tiny_llama(seed).save_pretrained(folder)
    return folder


def perturbed(model: torch.nn.Module, rel: float, seed: int) -> torch.nn.Module:
    """A stand-in for a public base: a copy with N(0, (rel * std)^2) added to every tensor (a fine-tune's distance)."""
    import copy

    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in out.parameters():
            scale = float(p.float().std()) if p.numel() > 1 else abs(float(p))
            p.add_(rel * scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return out.eval()


def references(model: str, plain: Path | None, base: str | None, base_noise: float | None, seed: int) -> dict:
    """level -> (reference model or None, why skipped or None, how it was made)."""
    from stip.audit.run import load_reference

    exact, _ = load_reference(str(plain) if plain is not None else model)
    refs = {"exact": (exact, None, f"the protected model's own plain weights ({model})"),
            "none": (None, None, "no weights")}
    if base is not None:
        refs["base"] = (load_reference(base)[0], None, f"public base {base}")
    elif base_noise:
        refs["base"] = (perturbed(exact, base_noise, seed), None,
                        f"stand-in base: the plain weights + N(0, ({base_noise:g} std)^2) per tensor")
    else:
        refs["base"] = (None, "no public base given (--base MODEL, or --base-noise REL for a stand-in)", "")
    return refs


def offload_view(traffic) -> tuple[list, list[torch.Tensor], str | None]:
    """Observations whose inputs are the padded rows of block 0's first linear group (one row per token), with
    their truth ids; and the group's name."""
    from stip.audit.context import Observation

    names = [n for n in (traffic.offload[0] if traffic.offload else {}) if n != "lm_head"]
    if not names:
        return [], [], None
    name = names[0]
    obs, ids = [], []
    for o, off, truth in zip(traffic.observations, traffic.offload, traffic.truth_ids):
        rows = off.get(name)
        if rows is not None and rows.shape[0] == o.inputs.shape[0]:
            obs.append(Observation(rows.float(), {}, dict(o.meta)))
            ids.append(truth)
    return obs, ids, name


def run_extra(name: str, ctx, budget_s: float):
    """An attack module outside the registry (EXTRA), with run_attack's handling: failures reported, never raised."""
    import importlib
    import traceback

    from stip.audit.attacks.base import AttackResult

    module = importlib.import_module(EXTRA[name])
    t0 = time.perf_counter()
    try:
        r = module.run(ctx)
    except Exception as e:  # noqa: BLE001 - one attack's failure must not stop the others
        return AttackResult(name, module.TITLE, None, skipped=f"error: {type(e).__name__}: {e}",
                            details={"traceback": traceback.format_exc(limit=6)[-3000:]},
                            seconds=time.perf_counter() - t0)
    if budget_s and r.seconds > budget_s:
        r.details = {**r.details, "over_budget": f"took {r.seconds:.0f} s, budget {budget_s:.0f} s"}
    return r


def run_level(names: list[str], ctx, budget_s: float) -> list[dict]:
    """Every attack on one context, each from the same torch seed; rows for the report."""
    from stip.audit.run import run_attack

    rows = []
    for name in names:
        torch.manual_seed(ctx.seed)
        t0 = time.perf_counter()
        r = run_extra(name, ctx, budget_s) if name in EXTRA else run_attack(name, ctx, budget_s)
        if r.skipped and r.skipped.startswith("error: BundleError") and "--tee-worker" in r.skipped:
            r.details = {**r.details, "error": r.skipped}
            r.skipped = TEE_BUNDLE_REFUSED
        print(f"  {name}: {r.skipped or ('%.3f %s' % (r.recovery, r.unit) if r.recovery is not None else 'done')}"
              f" ({time.perf_counter() - t0:.1f} s)", flush=True)
        rows.append(r.to_json())
    return rows


def audit(a: argparse.Namespace, work: Path) -> dict:
    """Protect, capture, attack at every level; the results' dict (without provenance)."""
    import stip
    from stip.audit.attacks import ATTACKS
    from stip.audit.context import AuditContext, Truth
    from stip.audit.corpus import token_ids
    from stip.audit.run import CharTokenizer, prompt_ids
    from stip.audit.tee_capture import capture_tee_traffic
    from stip.client.bundle import ClientBundle

    sizes = {**(QUICK if a.quick else FULL), **{k: v for k, v in vars(a).items() if k in FULL and v is not None}}
    plain = tiny_model(work / "plain", a.seed) if a.model == "tiny" else None
    out = work / "protected"
    t0 = time.perf_counter()
    from stip.models import resolve_model

    stip.protect(plain or resolve_model(a.model), out, progress=False, tee=True)  # "smollm2": the packaged GGUF
    protect_s = time.perf_counter() - t0
    client = ClientBundle.load(out / "client")
    tokenizer = client.tokenizer if client.has_tokenizer else CharTokenizer(client.vocab_size)
    prompts = prompt_ids(tokenizer, sizes["prompts"], sizes["prompt_tokens"])
    print(f"capturing {len(prompts)} prompts of {sizes['prompt_tokens']} tokens through the TEE path", flush=True)
    traffic = capture_tee_traffic(out, prompts, sizes["generate"], a.capture_layers, a.threads)
    names = list(ATTACKS) + list(EXTRA) if a.attacks is None else [n.strip() for n in a.attacks.split(",")
                                                                     if n.strip()]
    levels = [lv.strip() for lv in a.levels.split(",") if lv.strip()]
    refs = references(a.model, plain, a.base, a.base_noise if a.base_noise is not None
                      else (QUICK_BASE_NOISE if a.quick else None), a.seed)
    public = token_ids(tokenizer, "public", sizes["public_tokens"])
    heldout = token_ids(tokenizer, "heldout", sizes["heldout_tokens"])
    settings = {"quick": a.quick or a.attack_quick, **a.settings}

    def context(reference, observations, ids):
        return AuditContext(server_dir=out / "server", observations=observations, truth=Truth(ids, out),
                            tokenizer=tokenizer, reference=reference, public_ids=public, heldout_ids=heldout,
                            settings=dict(settings), seed=a.seed)

    results = {}
    for level in levels:
        reference, skipped, what = refs[level]
        print(f"level {level}: {skipped or what}", flush=True)
        results[level] = {"reference": what, "skipped": skipped, "attacks": [] if skipped else run_level(
            names, context(reference, traffic.observations, traffic.truth_ids), a.budget)}
    view_obs, view_ids, group = offload_view(traffic)
    strongest = next((lv for lv in LEVELS if lv in levels and not refs[lv][1]), None)
    offload = {"group": group, "level": strongest, "attacks": []}
    if a.offload_view and group is not None and strongest is not None:
        print(f"offload view (level {strongest}): padded rows of {group}", flush=True)
        offload["attacks"] = run_level([n for n in names if n not in NO_TRAFFIC and n not in EXTRA],
                                       context(refs[strongest][0], view_obs, view_ids), a.budget)
    return {"model": a.model, "quick": a.quick, "levels": levels, "attacks": names, "sizes": sizes,
            "traffic": _traffic_summary(traffic), "protect_s": round(protect_s, 1), "results": results,
            "offload_view": offload, "round_trip": round_trip_rows(a.model, names)}


def _traffic_summary(traffic) -> dict:
    obs = traffic.observations
    linears = {}
    for off in traffic.offload:
        for name, rows in off.items():
            linears[name] = linears.get(name, 0) + int(rows.shape[0])
    return {"requests": len(traffic.contexts), "observations": len(obs),
            "rows": sum(int(o.inputs.shape[0]) for o in obs),
            "capture_layers": sorted({layer for o in obs for layer in o.hidden}),
            "offload_rows": linears, "seconds": round(traffic.seconds, 1)}


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.audit_tee", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny random LLaMA, small sizes (the test's run)")
    ap.add_argument("--model", help="smollm2 (default), tiny, or a Hugging Face folder")
    ap.add_argument("--levels", default=",".join(LEVELS), help="attacker levels: exact, base, none")
    ap.add_argument("--base", help="the public base the model was fine-tuned from (level base)")
    ap.add_argument("--base-noise", type=float, help="level base without --base: the plain weights plus this much "
                    "noise (relative to each tensor's std), a stand-in for a fine-tune's base")
    ap.add_argument("--attacks", help="comma-separated attack names (default: every one in stip.audit.attacks, "
                    "then tee_vocab_matching)")
    ap.add_argument("--prompts", type=int)
    ap.add_argument("--prompt-tokens", dest="prompt_tokens", type=int)
    ap.add_argument("--generate", type=int, help="decode steps after each prefill")
    ap.add_argument("--capture-layers", help="decoder layers to record (default: first, middle, last)")
    ap.add_argument("--attack-quick", action="store_true", help="the attacks' small budgets (their quick settings)")
    ap.add_argument("--settings", type=json.loads, default={}, help="per-attack knobs as JSON, e.g. "
                    "'{\"vocab_matching\": {\"seconds\": 60}}' (each attack's docstring lists its own)")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds per attack before it is marked over budget")
    ap.add_argument("--no-offload-view", dest="offload_view", action="store_false",
                    help="skip the attacks on the padded linear rows")
    ap.add_argument("--threads", type=int, help="torch threads of the worker process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    a.model = a.model or ("tiny" if a.quick else "smollm2")
    unknown = [lv for lv in a.levels.split(",") if lv.strip() and lv.strip() not in LEVELS]
    if unknown:
        ap.error(f"unknown level(s) {', '.join(unknown)}; choose from {', '.join(LEVELS)}")
    return a


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stip-audit-tee-") as tmp:
        results = audit(a, Path(tmp))
    paths = write(results, a.out, argv, time.perf_counter() - t0)
    print("wrote " + ", ".join(str(p) for p in paths))
    return results


if __name__ == "__main__":
    main()
