"""A fine-tune of SmolLM2 on public text, for `stip audit --attacker base`: the served model is then not the public
model the attacker holds, but a model trained from it.

    python -m bench.finetune                    # SmolLM2: up to 300 steps, stopped after 10 minutes of training
    python -m bench.finetune --steps 5 --out /tmp/ft --results /tmp/ft-results      # a smoke run

A full fine-tune (every weight, AdamW) on the `public` part of stip.audit.corpus (English text that ships with
Python; never the `prompts` the audit sends nor the `heldout` part it measures with), in windows of `seq` tokens
drawn at random from all but the last `eval_tokens` tokens, which measure the loss before and after. Saved as a
plain Hugging Face folder (safetensors, config, tokenizer) that `stip protect` takes. Records the command, commit,
machine, steps, losses and seconds in RESULTS/finetune.json.
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

OUT = Path.home() / ".cache" / "stip" / "smollm2-finetune"
RESULTS = Path("bench/results/finetune")
# At most `steps` steps, stopped after `seconds` of training: on 2 shared cores a step of 2 x 32 tokens costs 5-20 s
# of CPU, so the clock, not the step count, ends a default run.
DEFAULTS = {"steps": 300, "seconds": 600.0, "seq": 32, "batch": 2, "lr": 1e-4, "eval_tokens": 1024,
            "public_tokens": 200_000}


def eval_loss(model, ids: torch.Tensor, seq: int) -> float:
    """Mean next-token loss over `ids` cut into windows of `seq` tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, seq):
            window = ids[start:start + seq + 1]
            if window.numel() < 2:
                break
            logits = model(input_ids=window[None, :-1]).logits[0].float()
            total += float(torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum"))
            count += window.numel() - 1
    return total / max(count, 1)


def _tokens(model, tokenizer, public_tokens: int) -> torch.Tensor:
    from stip.audit.corpus import token_ids
    from stip.audit.run import CharTokenizer

    vocab = int(model.get_input_embeddings().weight.shape[0])
    return token_ids(tokenizer if tokenizer is not None else CharTokenizer(vocab), "public", public_tokens)


def finetune(model: str | Path | torch.nn.Module, out: str | Path, steps: int = DEFAULTS["steps"],
             seq: int = DEFAULTS["seq"], batch: int = DEFAULTS["batch"], lr: float = DEFAULTS["lr"], seed: int = 0,
             eval_tokens: int = DEFAULTS["eval_tokens"], public_tokens: int = DEFAULTS["public_tokens"],
             log_every: int = 25, seconds: float | None = DEFAULTS["seconds"]) -> dict:
    """Fine-tune `model` (a packaged name, a folder, or a loaded causal LM) on the corpus's public part for at most
    `steps` steps and `seconds` of training, and save it to `out` as a plain Hugging Face folder. Returns what
    happened: steps done, losses, weight drift, seconds."""
    from stip.models import load_plain_model

    t0 = time.perf_counter()
    if isinstance(model, torch.nn.Module):
        net, tokenizer = model, None
    else:
        net, tokenizer = load_plain_model(model)
    ids = _tokens(net, tokenizer, public_tokens)
    if ids.numel() < eval_tokens + 4 * (seq + 1):
        raise SystemExit(f"error: the public text gave {ids.numel()} tokens; need more than eval_tokens + 4 windows")
    held, train = ids[-eval_tokens:], ids[:-eval_tokens]
    net.eval()  # these models have no dropout: one mode for training and the loss measurements
    start = {name: p.detach().clone() for name, p in net.named_parameters()}
    loss_before = eval_loss(net, held, seq)
    print(f"[finetune] loss before {loss_before:.4f} on {held.numel()} tokens; up to {steps} steps of {batch} x "
          f"{seq} tokens" + (f", {seconds:.0f} s" if seconds else ""), flush=True)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    train_losses = []
    t_train = time.perf_counter()
    for step in range(steps):
        if seconds and time.perf_counter() - t_train >= seconds:
            break
        starts = torch.randint(0, train.numel() - seq - 1, (batch,), generator=gen)
        windows = torch.stack([train[s:s + seq + 1] for s in starts.tolist()])
        loss = _lm_loss(net, windows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        train_losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"[finetune] step {step + 1}: loss {sum(train_losses[-log_every:]) / log_every:.4f} "
                  f"({time.perf_counter() - t_train:.0f} s)", flush=True)
    train_s = time.perf_counter() - t_train
    loss_after = eval_loss(net, held, seq)
    drift = _drift(net, start)
    _save(net, tokenizer, Path(out))
    done = len(train_losses)
    k = max(1, min(25, done // 2))
    return {"model": str(model) if not isinstance(model, torch.nn.Module) else type(model).__name__,
            "out": str(out), "steps": done, "max_steps": steps, "max_seconds": seconds, "batch": batch, "seq": seq,
            "lr": lr, "seed": seed,
            "method": "full fine-tune (every weight), AdamW, gradient norm clipped at 1",
            "train_tokens": int(train.numel()), "eval_tokens": int(held.numel()),
            "loss_before": loss_before, "loss_after": loss_after,
            "ppl_before": math.exp(loss_before), "ppl_after": math.exp(loss_after),
            "train_loss_first": sum(train_losses[:k]) / k if done else None,
            "train_loss_last": sum(train_losses[-k:]) / k if done else None,
            "weight_drift": drift, "train_seconds": round(train_s, 1),
            "seconds": round(time.perf_counter() - t0, 1)}


def _lm_loss(net, windows: torch.Tensor) -> torch.Tensor:
    logits = net(input_ids=windows[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), windows[:, 1:].reshape(-1))


def _drift(net, start: dict[str, torch.Tensor]) -> float:
    """How far the weights moved: ||W' - W|| / ||W|| over every parameter."""
    num = den = 0.0
    for name, p in net.named_parameters():
        num += float((p.detach() - start[name]).pow(2).sum())
        den += float(start[name].pow(2).sum())
    return math.sqrt(num / den) if den else 0.0


def _save(net, tokenizer, out: Path) -> None:
    """A plain Hugging Face folder: safetensors weights, config, generation config, tokenizer."""
    from stip.common.files import staged_directory

    if getattr(net, "hf_quantizer", None) is not None:  # GGUF: dequantized to float32 on load, plain weights now
        net.hf_quantizer = None
        if hasattr(net.config, "quantization_config"):
            del net.config.quantization_config
        net.is_quantized = False
    with staged_directory(out, overwrite=True) as stage:
        net.save_pretrained(stage, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)


def main(argv: list[str] | None = None) -> dict:
    from bench.report import git, machine_info

    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m bench.finetune", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (default) or a Hugging Face model folder")
    ap.add_argument("--out", type=Path, default=OUT, help=f"the fine-tuned model's folder (default {OUT})")
    ap.add_argument("--results", type=Path, default=RESULTS, help=f"where finetune.json goes (default {RESULTS})")
    for name, value in DEFAULTS.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, help=f"default {value}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=25, help="print the training loss every N steps")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    commit, dirty = git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    machine = machine_info()  # at the start: its load average is the one the run began under
    result = finetune(a.model, a.out, a.steps, a.seq, a.batch, a.lr, a.seed, a.eval_tokens, a.public_tokens,
                      a.log_every, a.seconds)
    record = {"command": shlex.join(["python", "-m", "bench.finetune", *argv]), "commit": commit, "dirty": dirty,
              "machine": machine, "torch_threads": torch.get_num_threads(), **result}
    a.results.mkdir(parents=True, exist_ok=True)
    (a.results / "finetune.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"[finetune] {result['steps']} steps in {result['train_seconds']:.0f} s: loss "
          f"{result['loss_before']:.4f} -> {result['loss_after']:.4f}; weights moved {result['weight_drift']:.2e}; "
          f"saved {a.out}", flush=True)
    return record


if __name__ == "__main__":
    main()
