"""What an attack gets: the attacker's view (server bundle, captured traffic, public weights and text) and, kept
apart, the auditor's truth for scoring (token ids sent, the keys). An attack must never read `truth` to attack,
only to score."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    """Everything an attack may use. `reference` is the public plaintext model the attacker holds (the protected
    model is a fine-tune of it, or it itself); None when the audit is run without one: attacks that need weights are
    then skipped, saying so."""

    server_dir: Path  # DIR/server: what the server holds
    observations: list[Observation]  # what the server received, in order
    truth: Truth
    tokenizer: Any  # the model's tokenizer (public)
    reference: torch.nn.Module | None = None  # public plaintext weights (a transformers model, eval mode, float32)
    public_ids: torch.Tensor | None = None  # token ids of a public text (the attacker's statistics / training data)
    heldout_ids: torch.Tensor | None = None  # token ids of held-out text (perplexity)
    settings: dict[str, Any] = field(default_factory=dict)  # per-attack knobs ("quick": small budgets for tests)
    seed: int = 0
