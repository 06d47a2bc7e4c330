"""Is TEE mode's padded offload lossless in float32, or only in float64? (issue 23, step 3)

    .venv/bin/python -m bench.tee_precision                       # SmolLM2; writes bench/results/tee/precision.*
    .venv/bin/python -m bench.tee_precision --quick --out /tmp/x  # a tiny random LLaMA (the test's run)

The model is protected with `--tee`; the enclave's part (`EnclaveModel`) runs in this process over the TEE worker in
this process (`LocalWorkerLink`), with the padded products computed in one of these ways:

  float64 (the enclave's): pads N(0, 1) x 2^20 x B, both sides in float64 (B: the group's calibrated bound);
  float32, pad 2^k B:      the same pads scaled to 2^k x B, rounded to float32; the worker's product in float32;
                           `W r` precomputed in float64 and stored in float32 (as a float32 pool would);
  field, F bits:           Slalom's pad over Z_q: operands quantized to F fractional bits (x) and F bits (W), the
                           products exact in the field, so the result is the quantized product whatever the pad;
                           emulated exactly in float64 (integers below 2^53).

For every variant and prompt, the plain model's greedy tokens are fed back step by step (teacher forcing) and the
enclave's logits compared with the plain model's at every step: the max-abs logit difference, and whether the
argmax equals the plain greedy token at every step (which is greedy generation being equal). Reference: the plain
model itself in float64 against float32. Hiding: a pad 2^k times the input bound leaves a per-coordinate
signal-to-noise ratio of 2^-2k in one observation, so averaging ~2^2k observations of one input reads it. Cost: the
worker's padded products for one decode token (all of block 0's groups, one row each), float64 against float32, on
this CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.tee_latency import PROMPT

PROMPTS = (PROMPT, "Write a haiku about autumn.", "What is 17 times 23?", "Name three uses of copper.")
FLOAT32_EXPONENTS = (20, 12, 8, 4, 0)
FIELD_BITS = (16, 8)


class Float32Pads:
    """A stand-in for the enclave's `Pads`: pads 2^k B rounded to float32, `W r` rounded to float32."""

    def __init__(self, exponent: int):
        self.exponent = exponent
        self.gen = torch.Generator().manual_seed(0)

    def take(self, name, weight64, bound, n):
        r = (torch.randn((n, weight64.shape[1]), generator=self.gen, dtype=torch.float64)
             * (2.0 ** self.exponent * bound)).float().double()
        return r, (r @ weight64.t()).float().double()


class Float32Link:
    """The worker's padded product in float32 (its weights and inputs rounded to float32)."""

    def __init__(self, link, worker):
        self.link, self.worker = link, worker
        self.seconds = 0.0

    def linear(self, name, x):
        w, b = worker_weights(self.worker, name)
        y = x.float() @ w.float().t()
        return (y if b is None else y + b.float()).double()

    def body(self, session, h, start):
        return self.link.body(session, h, start)

    def close(self, session):
        return self.link.close(session)


def worker_weights(worker, name):
    return worker._resolve(name)


def quantize(t: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.round(t.double() * 2.0 ** bits) / 2.0 ** bits


def use_field(model, bits: int) -> list:
    """Each offloaded group computes `q(x) q(W)^T + b` exactly, here (what a field pad returns once unpadded)."""
    from stip.enclave.offload import OffloadedLinear

    handles = []
    members = [m for m in model.base.modules() if isinstance(m, OffloadedLinear)]  # every group member
    for m in members + [m for m in model.offloaded() if m not in members]:
        m.weight64 = quantize(m.weight64, bits)
        m.calibrating = []  # the enclave's own exact product of what it is given
        handles.append(m.register_forward_pre_hook(lambda _m, args: (quantize(args[0], bits).to(args[0].dtype),)))
    return handles


def variants() -> list[tuple[str, dict]]:
    out = [("float64, pad 2^20 B (the enclave's)", {"kind": "float64", "exponent": 20})]
    out += [(f"float32, pad 2^{k} B", {"kind": "float32", "exponent": k}) for k in FLOAT32_EXPONENTS]
    out += [(f"field, {b}-bit fixed point", {"kind": "field", "bits": b}) for b in FIELD_BITS]
    return out


def enclave_for(spec: dict, config, tensors, worker):
    """The enclave's part over the worker in this process, computing its padded products as `spec` says."""
    from stip.enclave.compute import EnclaveModel
    from stip.server.tee_worker import LocalWorkerLink

    link = LocalWorkerLink(worker)
    model = EnclaveModel.from_tensors(config, tensors, link, pool_bytes=0)
    if spec["kind"] == "float32":
        model.link.link = Float32Link(link, worker)
        for m in model.offloaded():
            m.pads = Float32Pads(spec["exponent"])
    elif spec["kind"] == "field":
        use_field(model, spec["bits"])
    return model


@torch.no_grad()
def teacher_forced(model, ids: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """The enclave's logits after the prompt and after each of `tokens` but the last."""
    s = model.new_session()
    out = [model.prefill(s, ids)]
    for t in tokens[:-1]:
        out.append(model.decode(s, t))
    model.close(s)
    return out


@torch.no_grad()
def plain_reference(plain, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor], float]:
    """Plain greedy tokens, the plain logits at each step (float32), and the float64 model's max-abs difference."""
    import copy

    seq = torch.tensor([ids])
    out = plain.generate(seq, max_new_tokens=n, do_sample=False)
    tokens = out[0, len(ids):].tolist()
    full = torch.tensor([ids + tokens[:-1]])
    logits = plain(full).logits[0, len(ids) - 1:]
    l64 = copy.deepcopy(plain).double()(full).logits[0, len(ids) - 1:]
    return tokens, list(logits.float()), float((l64 - logits.double()).abs().max())


def worker_cost_ms(worker, groups: list[str], reps: int = 50) -> dict:
    """The worker's padded products for one decode token (one row per group), float64 against float32."""
    out = {}
    for dtype in (torch.float64, torch.float32):
        ws = [(w.to(dtype), None if b is None else b.to(dtype)) for w, b in map(worker._resolve, groups)]
        rows = [torch.randn(1, w.shape[1], dtype=dtype) for w, _ in ws]
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for (w, b), x in zip(ws, rows):
                y = x @ w.t()
                if b is not None:
                    y = y + b
            times.append((time.perf_counter() - t0) * 1e3)
        out[str(dtype).replace("torch.", "")] = statistics.median(times)
    return out


def run(model_name: str, prompts: int, tokens: int, log=print) -> dict:
    import stip
    from stip.developer.tee import read_enclave_tensors
    from stip.server.tee_worker import TeeWorker

    with tempfile.TemporaryDirectory(prefix="stip-tee-precision-") as tmp:
        if model_name == "smollm2":
            from stip.models import load_plain_model, resolve_model

            source, (plain, tok) = resolve_model("smollm2"), load_plain_model("smollm2")
            chats = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                     for p in PROMPTS[:prompts]]
            id_lists = [list(c["input_ids"] if hasattr(c, "keys") else c) for c in chats]
        else:
            from tests.models import build_tiny, save_tiny

            source, plain = save_tiny(model_name, Path(tmp) / "plain"), build_tiny(model_name)
            id_lists = [[(7 * i + 3 * j) % 90 + 3 for j in range(8)] for i in range(prompts)]
        stip.protect(source, Path(tmp) / "protected", progress=False, tee=True)
        config, tensors = read_enclave_tensors(Path(tmp) / "protected")
        worker = TeeWorker.from_bundle(Path(tmp) / "protected" / "server")
    plain = plain.eval()  # float32 already (SmolLM2 comes de-quantized from GGUF; .float() is refused)
    refs = [plain_reference(plain, ids, tokens) for ids in id_lists]
    rows = []
    for label, spec in variants():
        model = enclave_for(spec, config, tensors, worker)
        diff, equal = 0.0, True
        for ids, (toks, want, _) in zip(id_lists, refs):
            got = teacher_forced(model, ids, toks)
            diff = max(diff, max(float((g - w).abs().max()) for g, w in zip(got, want)))
            equal &= all(int(g.argmax()) == t for g, t in zip(got, toks))
        model.shutdown()
        snr = None if spec["kind"] == "field" else -2 * spec["exponent"]
        rows.append({"variant": label, **spec, "max_abs_logit_diff": diff, "greedy_equal": equal,
                     "snr_log2": snr})
        log(f"{label}: max-abs logit diff {diff:.3g}, greedy equal {equal}")
    groups = [m.key for m in enclave_for({"kind": "float64"}, config, tensors, worker).offloaded()]
    return {"model": model_name, "prompts": len(id_lists), "tokens": tokens,
            "prompt_tokens": [len(i) for i in id_lists], "variants": rows,
            "plain_float64_vs_float32": max(r[2] for r in refs),
            "worker_ms_per_token": worker_cost_ms(worker, groups), "groups": groups}


def markdown(r: dict) -> str:
    from bench.suite import tree_state

    g = r.get("git") or tree_state()
    cost = r["worker_ms_per_token"]
    lines = [f"# TEE mode: padded products in float64 or float32 ({r['model']})", "",
             f"`{r.get('command', 'python -m bench.tee_precision')}` at {g.get('commit', '?')[:12]}"
             f"{'' if g.get('clean') else ' (DIRTY TREE - not for committing)'}. {r['prompts']} prompts "
             f"({', '.join(map(str, r['prompt_tokens']))} tokens), {r['tokens']} greedy tokens each, teacher-forced; "
             f"max-abs logit difference against the plain float32 model over every step. The plain model's own "
             f"float64-vs-float32 difference: {r['plain_float64_vs_float32']:.3g}.", "",
             "| variant | max-abs logit diff | greedy equal | one observation's SNR per coordinate |",
             "|---|---:|---|---|"]
    for v in r["variants"]:
        snr = "quantized; a one-time pad: 0" if v["snr_log2"] is None else f"2^{v['snr_log2']}"
        lines.append(f"| {v['variant']} | {v['max_abs_logit_diff']:.3g} | {v['greedy_equal']} | {snr} |")
    lines += ["", f"Worker cost of block 0's padded products per decode token on this CPU (one row per group: "
              f"{', '.join(r['groups'])}): float64 {cost['float64']:.3f} ms, float32 {cost['float32']:.3f} ms."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    from bench.suite import tree_state

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny random LLaMA (the test's run)")
    ap.add_argument("--prompts", type=int, default=None, help=f"chat prompts (at most {len(PROMPTS)}; default 4, "
                    "--quick 2)")
    ap.add_argument("--tokens", type=int, default=None, help="greedy tokens per prompt (default 32, --quick 6)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/tee"), help="folder for precision.json/.md")
    a = ap.parse_args(argv)
    a.prompts = a.prompts or (2 if a.quick else 4)
    a.tokens = a.tokens or (6 if a.quick else 32)
    if not 1 <= a.prompts <= len(PROMPTS) or a.tokens < 1:
        ap.error(f"--prompts must be 1..{len(PROMPTS)} and --tokens at least 1")
    torch.set_num_threads(1)
    r = run("llama-gqa-untied" if a.quick else "smollm2", a.prompts, a.tokens,
            log=lambda m: print(m, file=sys.stderr, flush=True))
    r["command"] = " ".join(["python -m bench.tee_precision", *(argv if argv is not None else sys.argv[1:])])
    r["git"] = tree_state()
    a.out.mkdir(parents=True, exist_ok=True)
    stem = "precision" if not a.quick else "precision-tiny"
    (a.out / f"{stem}.json").write_text(json.dumps(r, indent=1) + "\n")
    (a.out / f"{stem}.md").write_text(markdown(r))
    print(markdown(r))
    return r


if __name__ == "__main__":
    main()
