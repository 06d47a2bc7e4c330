"""What `stip protect --harden aloepri` costs in accuracy on SmolLM2, per knob setting (docs/aloepri.md).

    python -m bench.aloepri_cost                        # the settings below, results to bench/results/aloepri/
    python -m bench.aloepri_cost --heldout-tokens 256 --out /tmp/aloepri

In process: the obfuscated checkpoint (exactly what the bundle's server holds) is run by transformers on held-out
text (stip.audit.corpus "heldout", windows of 128 tokens) in the secret vocabulary order, its logits mapped back,
against the plain model: top-1 agreement, perplexity, max |logit difference|. Rows:
- exact: h = 0, lambda = 0, no noise, no RoPE-block shuffle: the transform is exact, so its difference is float32
  rounding (shown beside the plain model's own float32-vs-float64 difference, and the same setting in float64);
- the paper's defaults without noise (kappa's RMSNorm error, lambda, the expansion, the block shuffle);
- the paper's defaults (alpha_e 1.0, alpha_h 0.2), and other noise levels.
The noise rows share the defaults' keys (one seed): the layers' tensors do not depend on the noise, so they are
transformed once and only the norms (kappa is estimated on the noisy embedding) and the embedding or LM head of a
new noise level are redone per row (`Rows`). `--full` adds rows built from scratch (other h, lambda, beta), about
three minutes each here. Writes OUT/aloepri_cost.{json,md}.
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

OUT = Path("bench/results/aloepri")
SEED = bytes(range(32))  # fixed: the bench is reproducible; a real protection draws its seed from os.urandom
EXACT = "h=0,lambda=0,alpha_e=0,alpha_h=0,beta=1"
# alpha_e:alpha_h. Ordered so that each row transforms at most one table (the defaults' two are made before it)
NOISE = "0:0,0.1:0,0.25:0,0.5:0,1.0:0,0:0.05,0:0.2,1.0:0.2"
SOURCES = ["stip/developer", "stip/common", "stip/models.py", "stip/audit/corpus.py", "bench/aloepri_cost.py"]


def evaluate(model, ids: torch.Tensor, reference: torch.Tensor, vocab: torch.Tensor | None = None) -> dict:
    """Top-1 agreement with `reference` (the plain logits), perplexity, max |logit difference|. `vocab`: the secret
    order (server id s is token vocab[s]); the model then takes server ids and its logits are mapped back."""
    inverse = None if vocab is None else torch.argsort(vocab)
    with torch.no_grad():
        logits = model(input_ids=ids if inverse is None else inverse[ids]).logits.float()
    if inverse is not None:
        logits = logits[..., inverse]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return {"top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
            "perplexity": math.exp(float(nll)), "max_abs_logit_diff": float((logits - reference).abs().max())}


class Rows:
    """The obfuscated models of one plain model, measured. A full row transforms every tensor. The noise rows share
    one seed, so the same keys: their layers' tensors are made once (the first noise row) into one model, and each
    later row reloads only the norms (kappa follows the embedding noise) and the embedding or LM head of its noise
    level, made once per level."""

    def __init__(self, plain, state: dict, ids: torch.Tensor, reference: torch.Tensor):
        self.plain, self.state, self.ids, self.reference = plain, state, ids, reference
        self.shared = None  # the noise rows' obfuscated model
        self.tables: dict[tuple[str, float], torch.Tensor] = {}  # (name, alpha) -> the transformed table

    def _obfuscate(self, options):
        from stip.developer.aloepri_model import AloepriModel

        return AloepriModel(self.plain.config, self.state, True, options, SEED, plain=self.plain)

    def full(self, label: str, options) -> dict:
        t0 = time.perf_counter()
        am = self._obfuscate(options)
        model = type(self.plain)(am.config()).eval()
        model.load_state_dict(dict(am.tensors()))
        return self._measure(label, am, model, t0)

    def noise(self, options) -> dict:
        from stip.developer.aloepri_transform import EMBEDDING, LM_HEAD, NORMS

        t0 = time.perf_counter()
        am = self._obfuscate(options)
        if self.shared is None:
            tensors = dict(am.tensors())
            self.shared = type(self.plain)(am.config()).eval()
        else:
            tensors = {n: am.tensor(n) for n in am.names() if NORMS.fullmatch(n)}
        for name, alpha in ((EMBEDDING, options.alpha_e), (LM_HEAD, options.alpha_h)):
            if (name, alpha) not in self.tables:
                self.tables[name, alpha] = tensors[name] if name in tensors else am.tensor(name)
            tensors[name] = self.tables[name, alpha]
        self.shared.load_state_dict(tensors, strict=False)
        eps = am.config().rms_norm_eps  # follows kappa (stip.developer.aloepri_kappa.obfuscated_eps)
        for module in self.shared.modules():
            if hasattr(module, "variance_epsilon"):
                module.variance_epsilon = eps
        defaults = options == type(options)()
        return self._measure("defaults" if defaults else f"alpha_e={options.alpha_e:g}, alpha_h={options.alpha_h:g}",
                             am, self.shared, t0)

    def _measure(self, label: str, am, model, t0: float) -> dict:
        row = {"setting": label, "options": am.options.as_dict(),
               **evaluate(model, self.ids, self.reference, am.key.vocab), "kappa_min": min(am.kappa.values()),
               "kappa_max": max(am.kappa.values()), "seconds": time.perf_counter() - t0}
        print(f"[aloepri_cost] {row}", flush=True)
        return row


def run_rows(plain, state: dict, ids: torch.Tensor, reference: torch.Tensor, noise: str,
             full: list[str]) -> list[dict]:
    from stip.developer.aloepri_options import parse_aloepri

    rows = Rows(plain, state, ids, reference)
    out = [rows.full("exact", parse_aloepri(EXACT))]
    out += [rows.full(f"no noise, {setting}", parse_aloepri(f"alpha_e=0,alpha_h=0,{setting}")) for setting in full]
    for pair in noise.split(","):
        alpha_e, alpha_h = (float(x) for x in pair.split(":"))
        out.append(rows.noise(parse_aloepri({"alpha_e": alpha_e, "alpha_h": alpha_h})))
    return out


def float64_figures(plain, state: dict, ids: torch.Tensor, reference: torch.Tensor) -> dict:
    """Where the exact row's difference comes from: the plain model's own float32-vs-float64 max |logit
    difference|, and the exact setting's obfuscated weights kept in float64 (model in float64) against the plain
    model in float64 (transformers' RMSNorm still computes in float32 inside a float64 model)."""
    import copy

    from stip.developer.aloepri_model import AloepriModel
    from stip.developer.aloepri_options import parse_aloepri

    double = copy.deepcopy(plain).double()
    am = AloepriModel(plain.config, state, True, parse_aloepri(EXACT), SEED, plain=plain)
    exact = type(plain)(am.config()).double().eval()
    exact.load_state_dict({n: am.transform(n, None if n not in state else state[n].double()) for n in am.names()})
    inverse = torch.argsort(am.key.vocab)
    with torch.no_grad():
        plain64 = double(input_ids=ids).logits
        exact64 = exact(input_ids=inverse[ids]).logits[..., inverse]
    return {"float_floor": float((plain64 - reference.double()).abs().max()),
            "exact_float64_diff": float((exact64 - plain64).abs().max())}


def markdown(res: dict) -> str:
    lines = [f"# `--harden aloepri` on {res['model']}: accuracy cost", "",
             f"Command: `{res['command']}`; commit {res['commit']}"
             + (f" (MODIFIED: {', '.join(res['dirty'])})" if res["dirty"] else "")
             + f"; {res['machine']['cpu']}, {res['machine']['cores']} cores; {res['seconds']:.0f} s.", "",
             f"In process, the obfuscated checkpoint against the plain model on {res['heldout_tokens']} held-out "
             f"tokens (windows of {res['window']}). Plain perplexity {res['plain_perplexity']:.2f}; the plain "
             f"model's own float32-vs-float64 max |logit difference|: {res['float_floor']:.1e}; the exact setting with "
             f"its weights kept in float64, against the plain model in float64: {res['exact_float64_diff']:.1e}. "
             "h: the expansion "
             "actually used (the smallest h' >= h with d + 2h' a multiple of the head count; SmolLM2: 128 -> 135). "
             "c: the norms' kappa scalars.", "",
             "| setting | h | lambda | alpha_e | alpha_h | beta | top-1 agreement | perplexity | max abs logit diff "
             "| c (min..max) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        o = r["options"]
        lines.append(f"| {r['setting']} | {o['h']} | {o['lambda']:g} | {o['alpha_e']:g} | {o['alpha_h']:g} | "
                     f"{o['beta']} | {100 * r['top1_agreement']:.1f}% | {r['perplexity']:.2f} | "
                     f"{r['max_abs_logit_diff']:.2e} | {r['kappa_min']:.3f}..{r['kappa_max']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m bench.aloepri_cost", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--heldout-tokens", type=int, default=1024)
    ap.add_argument("--noise", default=NOISE, help="alpha_e:alpha_h pairs, comma-separated")
    ap.add_argument("--full", action="append", default=[], metavar="KNOBS",
                    help="an extra row without noise, built from scratch, e.g. 'lambda=0,beta=1' (repeatable)")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    from bench.report import git, machine_info
    from stip.audit.corpus import token_ids
    from stip.common.files import write_bytes_atomic
    from stip.models import load_plain_model

    t0 = time.perf_counter()
    plain, tok = load_plain_model(a.model)
    if not plain.config.tie_word_embeddings:
        raise SystemExit("this bench reuses the tied SmolLM2 layout; pass a tied LLaMA-family model")
    state = {k: v for k, v in plain.state_dict().items() if k != "lm_head.weight"}
    window = 128
    ids = token_ids(tok, "heldout", a.heldout_tokens)[: a.heldout_tokens // window * window].view(-1, window)
    with torch.no_grad():
        reference = plain(input_ids=ids).logits.float()
    res = {"model": a.model, "heldout_tokens": int(ids.numel()), "window": window,
           "plain_perplexity": evaluate(plain, ids, reference)["perplexity"],
           **float64_figures(plain, state, ids, reference),
           "rows": run_rows(plain, state, ids, reference, a.noise, a.full),
           "command": shlex.join(["python", "-m", "bench.aloepri_cost", *argv]), "commit": git("rev-parse", "HEAD"),
           "dirty": [line.split(maxsplit=1)[1] for line in (git("status", "--porcelain", "--", *SOURCES) or "").splitlines()],
           "machine": machine_info(), "seconds": time.perf_counter() - t0}
    a.out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(a.out / "aloepri_cost.json", (json.dumps(res, indent=2) + "\n").encode())
    write_bytes_atomic(a.out / "aloepri_cost.md", markdown(res).encode())
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
