"""What `--noise SIGMA` costs and what it hides, over a sweep of SIGMA: the trade-off behind the hardened modes.

    python -m bench.noise_sweep                       # SmolLM2, SIGMA in 0.01 ... 0.3
    python -m bench.noise_sweep --sigmas 0.01,0.1 --out /tmp/sweep

Per SIGMA, two numbers, both in process on the plain model (the hardened transform is exact, so the only loss a
mode adds is its noise; `bench.audit_table` measures the same through the real server for its modes):
- cost: held-out text (512 tokens, 4 windows of 128) with fresh N(0, (SIGMA rms(E))^2) noise on each embedding row,
  against the noiseless logits: top-1 agreement and perplexity;
- linking: two noisy copies of one token lie about sqrt(2 d) SIGMA rms(E) apart, and `stip audit`'s `frequency`
  links rows within twice that. The share of prompt-token occurrences whose nearest other token lies within that
  threshold (their rows would merge with another token's) says where noise starts to unlink codes; below it,
  every token keeps one code however many requests a server sees. Only the other tokens of the same text count (a
server only links rows it receives).

Writes OUT/noise_sweep.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

OUT = Path("bench/results/audit")
SIGMAS = "0.01,0.03,0.05,0.1,0.2,0.3"


def cost(model, table: torch.Tensor, ids: torch.Tensor, sigma: float, seed: int) -> dict:
    """Top-1 agreement and perplexity with noise on the embedding rows, against the same windows without."""
    rms = float(table.pow(2).mean().sqrt())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
        x = table[ids] + torch.randn(ids.shape + (table.shape[1],), generator=g) * sigma * rms
        got = model(inputs_embeds=x).logits.float()

    def ppl(logits):
        return math.exp(float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                                ids[:, 1:].reshape(-1))))

    return {"top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
            "ppl_plain": ppl(ref), "ppl_noisy": ppl(got)}


def merge_share(table: torch.Tensor, ids: torch.Tensor, sigma: float, link: float = 2.0) -> float:
    """Share of token occurrences in `ids` whose nearest other token of `ids` is within `link` noisy-copy
    distances (only tokens that occur in the traffic can be merged with)."""
    rms = float(table.pow(2).mean().sqrt())
    tokens, counts = ids.unique(return_counts=True)
    dist = torch.cdist(table[tokens], table[tokens])
    dist.fill_diagonal_(float("inf"))
    nearest = dist.min(1).values
    threshold = link * (2.0 * table.shape[1]) ** 0.5 * sigma * rms
    return float(counts[nearest < threshold].sum() / counts.sum())


def markdown(res: dict) -> str:
    lines = [f"# `--noise SIGMA` on {res['model']}: accuracy cost and code linking", "",
             f"Command: `{res['command']}`; commit {res['commit']}" + (" (DIRTY TREE - not for committing)"
                                                                       if res["dirty"] else "")
             + f"; {res['machine']['cpu']}, {res['machine']['cores']} cores; {res['seconds']:.0f} s.", "",
             "In process on the plain model (the hardened transform is exact; the noise is the only loss). Top-1 and "
             f"perplexity: {res['heldout_tokens']} held-out tokens, noisy against noiseless. Tokens that would link "
             "with another: share of prompt-token occurrences (2000 tokens) whose nearest other token of that text "
             "lies within the `frequency` attack's linking threshold (0% means every token keeps its own code).", "",
             "| SIGMA | top-1 agreement | perplexity (plain -> noisy) | tokens that would link with another |",
             "|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['sigma']:g} | {100 * r['top1_agreement']:.1f}% | {r['ppl_plain']:.2f} -> "
                     f"{r['ppl_noisy']:.2f} | {100 * r['merge_share']:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m bench.noise_sweep", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sigmas", default=SIGMAS)
    ap.add_argument("--heldout-tokens", type=int, default=512)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    from bench.report import git, machine_info
    from stip.audit.corpus import token_ids
    from stip.common.files import write_bytes_atomic
    from stip.models import load_plain_model

    t0 = time.perf_counter()
    model, tok = load_plain_model(a.model)
    model.eval()
    table = model.get_input_embeddings().weight.detach().float()
    window = 128
    heldout = token_ids(tok, "heldout", a.heldout_tokens)[: a.heldout_tokens // window * window].view(-1, window)
    prompts = token_ids(tok, "prompts", 2000)
    rows = []
    for i, sigma in enumerate(float(s) for s in a.sigmas.split(",")):
        rows.append({"sigma": sigma, **cost(model, table, heldout, sigma, seed=i),
                     "merge_share": merge_share(table, prompts, sigma)})
        print(f"[noise_sweep] {rows[-1]}", flush=True)
    res = {"model": a.model, "rows": rows, "heldout_tokens": int(heldout.numel()),
           "command": shlex.join(["python", "-m", "bench.noise_sweep", *argv]), "commit": git("rev-parse", "HEAD"),
           "dirty": bool(git("status", "--porcelain", "--untracked-files=no")), "machine": machine_info(),
           "seconds": time.perf_counter() - t0}
    a.out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(a.out / "noise_sweep.json", (json.dumps(res, indent=2) + "\n").encode())
    write_bytes_atomic(a.out / "noise_sweep.md", markdown(res).encode())
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
