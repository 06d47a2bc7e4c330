"""The result every attack returns, so the report can tabulate and plot any of them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class AttackResult:
    name: str  # registry name, e.g. "vocab_matching"
    title: str  # a human title for the report
    recovery: float | None  # share recovered, 0..1 (tokens, or key entries: see `unit`); None when skipped
    unit: str = "tokens"  # what `recovery` counts: "tokens", "key entries", ...
    details: dict[str, Any] = field(default_factory=dict)  # JSON-able numbers behind `recovery` (per key part, ...)
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # plot name -> {"x": [...], "y": [...],
    # "xlabel": ..., "ylabel": ...} (lists of numbers; labels as one-element lists are not needed: use details)
    seconds: float = 0.0
    skipped: str | None = None  # why the attack did not run (e.g. "needs reference weights")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
