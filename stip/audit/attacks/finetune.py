"""Fine-tuning attack (the paper's Table V): can the server make the protected body its own by training a new token
embedding and LM head on it with public text, better than it could train the same model from scratch?

Three rows, on held-out text (`ctx.heldout_ids`), trained on `ctx.public_ids`:
- "protected body": the server bundle's blocks (loaded as the server loads them), FROZEN, with a new embedding and
  LM head trained in front of and behind them;
- "scratch": the same architecture, randomly initialised, every weight trained, same steps, batch and sequence length;
- "original": the public reference model itself (no training), when the audit has one.
Each row has test loss (mean next-token cross-entropy), top-1 accuracy and perplexity (exp of the loss), beside the
paper's numbers (GPT-2 on WikiText-2) in `details["paper"]`. `recovery` is None (unit "loss"): this measures how
useful the stolen body is, not tokens recovered.

CPU budget: the vocabulary is cut to the tokens that occur in the public and held-out text (the rows the attacker can
learn at all; an `original` row's logits are restricted to the same tokens, so all three rows score the same task),
and the body's training stops at `steps` or `seconds`, whichever comes first; scratch then gets the same number of
steps unless it passes `scratch_seconds` (a step of it costs about 2-4x one of the frozen body on SmolLM2: every
weight gets a gradient), and `runs` records the steps each got. On SmolLM2 on a 2-core CPU a step of 64 tokens takes
0.25 s (idle) to 7 s (load 6), so the default budget (under 2 minutes) trains for 4 to 100 steps: far from converged,
as the report's curves show; raise `steps`, `seconds` and `scratch_seconds` to train further.
Settings (`ctx.settings["finetune"]`): `steps`, `batch`, `seq`, `lr`, `seconds`, `scratch_seconds`, `eval_tokens`.
"""

from __future__ import annotations

import math
import time

import torch

from stip.audit.attacks.base import AttackResult

NAME = "finetune"
TITLE = "Fine-tuning attack: a new embedding and LM head on the frozen protected body vs training from scratch"

DEFAULTS = dict(steps=200, batch=2, seq=32, lr=3e-3, seconds=25.0, scratch_seconds=60.0, eval_tokens=1024)
QUICK = dict(steps=40, batch=8, seq=16, seconds=10.0, scratch_seconds=20.0, eval_tokens=512)
PAPER = {  # Table V, GPT-2 on WikiText-2: test loss / accuracy / perplexity
    "original": dict(loss=3.42, accuracy=0.38, perplexity=31),
    "transformed (protected body)": dict(loss=6.82, accuracy=0.15, perplexity=919),
    "scratch": dict(loss=6.29, accuracy=0.18, perplexity=538),
    "adapter": dict(loss=9.54, accuracy=0.11, perplexity=13963),
}


def settings(ctx) -> dict:
    out = dict(DEFAULTS)
    if ctx.settings.get("quick"):
        out |= QUICK
    return out | dict(ctx.settings.get(NAME, {}))


class _Head(torch.nn.Module):
    """A transformer body between a new embedding and a new LM head over the kept vocabulary."""

    def __init__(self, body: torch.nn.Module, vocab: int, hidden: int, std: float, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.body = body
        self.embed = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g) * std)
        self.head = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g) * std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.body(inputs_embeds=self.embed[ids]).last_hidden_state
        return h @ self.head.T


def _batches(ids: torch.Tensor, seq: int) -> torch.Tensor:
    n = (len(ids) - 1) // seq
    return torch.stack([ids[i * seq: i * seq + seq + 1] for i in range(n)])  # [n, seq + 1]: inputs and next tokens


@torch.no_grad()
def _evaluate(logits_of, windows: torch.Tensor) -> dict[str, float]:
    loss, correct, count = 0.0, 0, 0
    for w in windows.split(8):
        logits = logits_of(w[:, :-1])
        target = w[:, 1:]
        loss += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum"))
        correct += int((logits.argmax(-1) == target).sum())
        count += target.numel()
    mean = loss / max(count, 1)
    return dict(loss=mean, accuracy=correct / max(count, 1), perplexity=math.exp(min(mean, 50.0)))


def _train(model: _Head, windows: torch.Tensor, opts: dict, steps: int, seed: int) -> tuple[list[float], int, float]:
    """Adam on the trainable parameters; returns (train loss per step, steps done, seconds)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.Adam(params, lr=opts["lr"])
    g = torch.Generator().manual_seed(seed)
    losses, start = [], time.monotonic()
    model.train()
    for _ in range(steps):
        w = windows[torch.randint(len(windows), (opts["batch"],), generator=g)]
        logits = model(w[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten())
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(float(loss.detach()))
        if time.monotonic() - start > opts["seconds"]:
            break
    model.eval()
    return losses, len(losses), time.monotonic() - start


def run(ctx) -> AttackResult:
    start = time.monotonic()
    if ctx.public_ids is None or ctx.heldout_ids is None:
        return AttackResult(NAME, TITLE, None, unit="loss", skipped="needs public training text and held-out text")
    from stip.server.model import load_protected_model

    opts = settings(ctx)
    torch.manual_seed(ctx.seed)
    protected, _ = load_protected_model(ctx.server_dir)
    config = protected.config
    hidden = protected.get_output_embeddings().weight.shape[1] if protected.get_output_embeddings() is not None \
        else int(config.hidden_size)
    kept = torch.unique(torch.cat([ctx.public_ids, ctx.heldout_ids]).long())  # sorted plain token ids
    compact = torch.full((int(kept.max()) + 1,), -1, dtype=torch.long)
    compact[kept] = torch.arange(len(kept))
    train = _batches(compact[ctx.public_ids.long()], opts["seq"])
    test = _batches(compact[ctx.heldout_ids.long()], opts["seq"])[: max(1, opts["eval_tokens"] // opts["seq"])]
    if len(train) == 0 or len(test) == 0:
        return AttackResult(NAME, TITLE, None, unit="loss", skipped="too little text for one training window")
    std = float(getattr(config, "initializer_range", 0.02))

    body = protected.base_model
    for p in body.parameters():
        p.requires_grad_(False)
    attacked = _Head(body, len(kept), hidden, std, ctx.seed)
    rows, runs = {}, {}
    losses, steps, seconds = _train(attacked, train, opts, opts["steps"], ctx.seed)
    rows["protected body"] = _evaluate(attacked, test)
    runs["protected body"] = dict(steps=steps, seconds=seconds, trained_parameters=2 * len(kept) * hidden)
    body_losses = losses
    del attacked, protected, body

    torch.manual_seed(ctx.seed)
    fresh = _fresh_model(config)
    scratch = _Head(fresh.base_model, len(kept), hidden, std, ctx.seed)
    losses, s_steps, seconds = _train(scratch, train, {**opts, "seconds": opts["scratch_seconds"]}, steps, ctx.seed)
    rows["scratch"] = _evaluate(scratch, test)
    runs["scratch"] = dict(steps=s_steps, seconds=seconds,
                           trained_parameters=sum(p.numel() for p in scratch.parameters()))
    curves = _curves(body_losses, losses)
    del scratch, fresh

    if ctx.reference is not None:
        ref = ctx.reference.eval()
        rows["original"] = _evaluate(lambda ids: ref(input_ids=kept[ids]).logits[..., kept], test)
    return AttackResult(
        NAME, TITLE, None, unit="loss",
        details=dict(rows=rows, runs=runs, same_steps=runs["scratch"]["steps"] == runs["protected body"]["steps"],
                     paper=PAPER, vocabulary=len(kept), train_tokens=int(train[:, 1:].numel()),
                     test_tokens=int(test[:, 1:].numel()), settings=opts,
                     note="the body is useful to the attacker only where its row beats scratch at the same budget"),
        curves=curves, seconds=time.monotonic() - start)


def _curves(body: list[float], scratch: list[float]) -> dict:
    """Training loss per step, both rows on one plot where they trained the same steps."""
    labels = dict(xlabel="step", ylabel="train loss (cross-entropy)")
    if len(body) == len(scratch):
        return {"training loss": dict(x=list(range(1, len(body) + 1)), y={
            "new embedding + LM head, frozen protected body": body, "same architecture from scratch": scratch},
            **labels)}
    return {"training loss: frozen protected body": dict(x=list(range(1, len(body) + 1)), y=body, **labels),
            "training loss: from scratch": dict(x=list(range(1, len(scratch) + 1)), y=scratch, **labels)}


def _fresh_model(config):
    """The same architecture, randomly initialised (the attacker's from-scratch baseline)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)
