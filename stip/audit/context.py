"""What an attack gets: the attacker's view (server bundle, captured traffic, public weights and text) and, kept
apart, the auditor's truth for scoring (token ids sent, the keys). An attack must never read `truth` to attack,
only to score."""

from __future__ import annotations

from dataclasses import dataclass, field
import time
from pathlib import Path
from typing import Any

import torch


@dataclass
class Observation:
    """One request as the server process received it (read back from a `stip serve --capture` directory)."""

    inputs: torch.Tensor  # [T, d] float32: the rows the server received (protected basis), in arrival order
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer index -> [T, d] hidden state after it
    meta: dict[str, Any] = field(default_factory=dict)  # session, kind ("prefill"/"decode"), start position


@dataclass
class Truth:
    """The auditor's secrets, for scoring only."""

    ids: list[torch.Tensor]  # per observation: the [T] token ids whose rows the server received
    bundle_dir: Path  # the whole protected dir (DIR/server, DIR/client, DIR/developer): keys for key-recovery scores


@dataclass
class AuditContext:
    """Everything an attack may use. `level` is what the attacker knows (stip.audit.levels): "none" (no weights:
    `reference` is None, attacks that need weights skip, saying so), "base" (`reference` is the public base the
    protected model was fine-tuned from) or "exact" (`reference` is its own plaintext weights). `public_lm`, where
    given, is a public language model with the same tokenizer, to be used through its predictions only (at level
    none its weights are not the protected model's). `deadline` is when the attack's budget ends
    (time.perf_counter()); the driver stops the attack there, keeping `partial` if the attack left one."""

    server_dir: Path  # DIR/server: what the server holds
    observations: list[Observation]  # what the server received, in order
    truth: Truth
    tokenizer: Any  # the model's tokenizer (public)
    reference: torch.nn.Module | None = None  # public plaintext weights (a transformers model, eval mode, float32)
    public_ids: torch.Tensor | None = None  # token ids of a public text (the attacker's statistics / training data)
    heldout_ids: torch.Tensor | None = None  # token ids of held-out text (perplexity)
    settings: dict[str, Any] = field(default_factory=dict)  # per-attack knobs ("quick": small budgets for tests)
    seed: int = 0
    level: str | None = None  # "none", "base", "exact" (stip.audit.levels); None: exact with a reference, else none
    public_lm: torch.nn.Module | None = None  # a public causal LM, same tokenizer (its predictions, not its weights)
    deadline: float | None = None  # time.perf_counter() at which the driver stops this attack; None: no budget
    partial: Any = None  # an AttackResult the attack updates as it goes: reported if it is stopped at the budget

    def __post_init__(self):
        if self.level is None:
            self.level = "none" if self.reference is None else "exact"

    def seconds_left(self) -> float:
        """Seconds until the budget ends (inf without one): size the next piece of work by it."""
        return float("inf") if self.deadline is None else self.deadline - time.perf_counter()
