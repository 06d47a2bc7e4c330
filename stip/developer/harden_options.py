"""`stip protect --harden/--noise`: which hardening options a model, a mode and TEE can carry (docs/hardened.md).

Checked before the slow part, and again against a reused key's own options, so that a refusal names the option.
"""

from __future__ import annotations

import stip.errors
from stip.common.architectures import Architecture
from stip.common.bundles.completeness import ROUND_TRIP
from stip.common.keys import HARDEN_OPTIONS
from stip.common.layout import HEAD_CLIENT, HEADS
from stip.common.tasks import SESSION_TASKS


class HardenOptionError(stip.errors.StipError, ValueError):
    """A bad --harden / --noise value or combination (the CLI prints it without a traceback)."""


def resolve_harden(arch: Architecture, model_type: str, harden, noise: float, mode: str,
                   tee: bool) -> tuple[str, ...]:
    """The hardening options asked for ("mix,rope", a list, or "all": every option the family supports), in
    canonical order; refuses options the family, the mode or TEE cannot carry, naming them."""
    asked = [o.strip() for o in (harden.split(",") if isinstance(harden, str) else harden) if o and o.strip()]
    if "all" in asked:
        asked = [o for o in asked if o != "all"] + list(arch.harden or ["all"])
    for o in asked:
        if o not in HARDEN_OPTIONS and o != "all":
            raise HardenOptionError(f"unknown hardening option {o!r}; choose from {', '.join(HARDEN_OPTIONS)} or all")
        if o not in arch.harden:
            why = " (its GELU admits no exact rescaling)" if o == "ffn" and arch.harden else ""
            raise stip.errors.UnsupportedModelError(
                f"{model_type} models do not support --harden {o}{why}; "
                + (f"{model_type} supports {', '.join(arch.harden)}" if arch.harden
                   else "hardened modes cover LLaMA-family (llama, mistral, qwen2) and GPT-2 models"))
    if not isinstance(noise, (int, float)) or not 0 <= float(noise) < 1:  # NaN fails too
        raise HardenOptionError(f"--noise must be a number in [0, 1), relative to the embedding table's RMS; "
                                f"got {noise!r}")
    if noise and not arch.harden:
        raise stip.errors.UnsupportedModelError(
            f"{model_type} models do not support --noise; it covers LLaMA-family (llama, mistral, qwen2) and GPT-2 "
            "models")
    if (asked or noise) and (mode != ROUND_TRIP or tee):
        what = "--tee" if tee else f"{mode} mode"
        raise HardenOptionError(f"--harden and --noise need round-trip mode without --tee (the client embeds); "
                                f"not {what}")
    return tuple(o for o in HARDEN_OPTIONS if o in asked)


def check_head(head: str, mode: str, tee: bool, task: str) -> str:
    """`stip protect --head`: "server" (the default) or "client" (docs/head-client.md), which needs a causal LM in
    round-trip mode without --tee; refused otherwise, saying why."""
    if head not in HEADS:
        raise HardenOptionError(f"--head must be one of {', '.join(HEADS)}, got {head!r}")
    if head != HEAD_CLIENT:
        return head
    if mode != ROUND_TRIP:
        raise HardenOptionError(f"--head client needs round-trip mode, not {mode}: in {mode} mode the server "
                                "samples the next token, so it must hold the LM head")
    if tee:
        raise HardenOptionError("--head client does not combine with --tee: in TEE mode the enclave holds the LM "
                                "head and computes the logits, and the GPU worker never gets it")
    if task not in SESSION_TASKS:
        raise stip.errors.UnsupportedModelError(f"--head client moves a causal LM's head to the client; this is a "
                                                f"{task} model, which has no LM head to move")
    return head
