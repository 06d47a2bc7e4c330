"""Running the attacks: each under its time budget (stopped there, see stip.audit.budget), each at every knowledge
level asked (stip.audit.levels). An attack that reads neither `reference` nor `level` gets the same inputs at
every level, so its first result stands for the others instead of running again."""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback

import torch

from stip.audit.attacks import load
from stip.audit.attacks.base import AttackResult
from stip.audit.budget import BudgetExceeded, stop_after
from stip.audit.context import AuditContext

log = logging.getLogger("stip.audit")

LEVEL_FIELDS = ("reference", "level")  # what differs between levels (public_lm is the same at every level)


class _LevelReads(AuditContext):
    """An AuditContext that notes which of LEVEL_FIELDS the attack read."""

    def __getattribute__(self, name):
        if name in LEVEL_FIELDS:
            reads = object.__getattribute__(self, "__dict__").get("level_reads")
            if reads is not None:
                reads.add(name)
        return object.__getattribute__(self, name)


def _for_attack(ctx: AuditContext, **changes) -> _LevelReads:
    fields = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(AuditContext)}
    tracked = _LevelReads(**{**fields, **changes, "partial": None, "deadline": None})
    vars(tracked)["level_reads"] = set()
    return tracked


def stopped_message(budget_s: float) -> str:
    return f"stopped at the budget ({budget_s:.0f} s)"


def run_attack(name: str, ctx: AuditContext, budget_s: float | None = None) -> AttackResult:
    """One attack, stopped at `budget_s` seconds (see stip.audit.budget); a missing module is "not implemented",
    an exception is reported as an error, never raised. A module's LEVELS (if it has one) names the levels it
    applies at; at others it is skipped, saying so."""
    t0 = time.perf_counter()
    try:
        module = load(name)
    except ModuleNotFoundError as e:
        if e.name == f"stip.audit.attacks.{name}":
            return AttackResult(name, name, None, skipped="not implemented")
        return AttackResult(name, name, None, skipped=f"error: {type(e).__name__}: {e}",
                            seconds=time.perf_counter() - t0)
    title = getattr(module, "TITLE", name)
    applies = getattr(module, "LEVELS", None)
    if applies is not None and ctx.level not in applies:
        return AttackResult(name, title, None, skipped=f"does not apply at level {ctx.level} (only at "
                                                       f"{', '.join(applies)})")
    ctx.deadline, ctx.partial = (t0 + budget_s if budget_s else None), None
    try:
        with stop_after(budget_s) as timer:
            result = module.run(ctx)
    except BudgetExceeded:
        return _stopped(name, title, ctx.partial, budget_s, t0)
    except Exception as e:  # noqa: BLE001 - one attack's failure must not stop the audit
        log.error("attack %s failed: %s", name, e)
        return AttackResult(name, title, None, skipped=f"error: {type(e).__name__}: {e}",
                            details={"traceback": traceback.format_exc(limit=6)[-3000:]},
                            seconds=time.perf_counter() - t0)
    if not isinstance(result, AttackResult):
        return AttackResult(name, title, None, skipped=f"error: run() returned {type(result).__name__}",
                            seconds=time.perf_counter() - t0)
    result.seconds = result.seconds or time.perf_counter() - t0
    if timer.fired:  # the attack caught BudgetExceeded itself and returned what it had
        result.details = {**result.details, "stopped": stopped_message(budget_s)}
    elif budget_s and result.seconds > budget_s:  # no timer could be armed here (not the main thread)
        result.details = {**result.details, "over_budget": f"took {result.seconds:.0f} s, budget {budget_s:.0f} s"}
    return result


def _stopped(name: str, title: str, partial, budget_s: float, t0: float) -> AttackResult:
    """The result of an attack stopped at its budget: its partial result if it left one in ctx.partial."""
    message = stopped_message(budget_s)
    log.warning("attack %s %s", name, message)
    if isinstance(partial, AttackResult):
        partial = dataclasses.replace(partial, details={**partial.details, "stopped": message})
        partial.seconds = time.perf_counter() - t0
        return partial
    return AttackResult(name, title, None, skipped=message, seconds=time.perf_counter() - t0)


def run_levels(names: list[str], ctx: AuditContext, levels: dict[str, torch.nn.Module | None], seed: int,
               budget_s: float | None) -> list[tuple[str, AttackResult]]:
    """Every attack at every level ({level: the reference weights its attacker holds}), attack by attack, each
    from the same torch seed: [(level, result)]. `settings[attack]["budget_s"]` overrides `budget_s`."""
    out = []
    for name in names:
        own = ctx.settings.get(name)
        budget = own.get("budget_s", budget_s) if isinstance(own, dict) else budget_s
        first: tuple[str, AttackResult] | None = None
        for level, reference in levels.items():
            if first is not None:
                out.append((level, _same_as(first)))
                continue
            log.info("audit: attack %s, level %s", name, level)
            torch.manual_seed(seed)
            tracked = _for_attack(ctx, reference=reference, level=level)
            r = run_attack(name, tracked, budget)
            log.info("audit: %s at level %s: %s (%.1f s)", name, level, r.skipped or (
                f"{r.recovery:.3f} {r.unit}" if r.recovery is not None else "done"), r.seconds)
            out.append((level, r))
            if not vars(tracked)["level_reads"] and not r.skipped:
                first = (level, r)
    return out


def _same_as(first: tuple[str, AttackResult]) -> AttackResult:
    level, r = first
    return dataclasses.replace(r, details={**r.details, "same_as_level": level}, seconds=0.0)
