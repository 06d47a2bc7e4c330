"""`stip protect --harden/--noise`: which hardening options a model, a mode and TEE can carry (docs/hardened.md).

Checked before the slow part, and again against a reused key's own options, so that a refusal names the option.
"""

from __future__ import annotations

import stip.errors
from stip.common.architectures import Architecture
from stip.common.bundles.completeness import ROUND_TRIP
from stip.common.keys import HARDEN_OPTIONS


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
