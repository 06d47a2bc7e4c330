"""What the attacker knows: the knowledge levels `stip audit --attacker` runs, and the models each level holds.

- `none`: the server bundle, public text and a public language model with the same tokenizer (`public_lm`), but
  not the model's weights (a proprietary model trained from scratch). Attacks that need weights skip.
- `base`: the served model is a fine-tune, and the attacker holds the public base it came from (`--reference`).
- `exact`: the attacker holds the exact plaintext weights (`--exact`, or `--reference` when only this weight
  level is asked): the worst case, and today's `--reference`.

One capture serves every level asked; each attack runs once per level where it applies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stip.errors import StipError

LEVELS = ("none", "base", "exact")
AUTO = "auto"  # public_lm: the packaged model (smollm2) when its tokenizer is the protected model's


def parse_levels(levels: str | list[str] | tuple[str, ...] | None, reference=None, exact=None) -> list[str]:
    """The levels asked, in LEVELS order; by default `exact` when weights are given, else `none`."""
    if levels is None:
        return ["exact"] if reference is not None or exact is not None else ["none"]
    names = [x.strip() for x in (levels.split(",") if isinstance(levels, str) else levels) if x and x.strip()]
    unknown = [x for x in names if x not in LEVELS]
    if unknown or not names:
        raise StipError(f"unknown attacker level(s) {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join(LEVELS)} (or a comma list)")
    return [x for x in LEVELS if x in names]


def attacker_weights(levels: list[str], reference=None, exact=None) -> dict[str, Any]:
    """Level -> the weights its attacker holds (a name, a folder or a loaded model; None at `none`).
    `reference` is the base at level base and, when base is not asked, the exact weights; `exact` is level exact's."""
    if exact is not None and "exact" not in levels:
        raise StipError("--exact gives the weights of level exact; add exact to --attacker (e.g. --attacker "
                        f"{','.join(levels + ['exact'])})")
    if reference is not None and levels == ["none"]:
        raise StipError("--reference gives weights the attacker holds, but level none holds none; ask for "
                        "--attacker base or exact (or leave --reference out)")
    out: dict[str, Any] = {}
    for level in levels:
        if level == "none":
            out[level] = None
        elif level == "base":
            if reference is None:
                raise StipError("level base needs --reference BASE: the public model the served one was "
                                "fine-tuned from")
            out[level] = reference
        elif exact is not None:
            out[level] = exact
        elif reference is not None and "base" not in levels:
            out[level] = reference
        else:
            raise StipError("level exact needs --exact MODEL: the protected model's own plaintext weights"
                            + ("; --reference is the base here" if reference is not None else ""))
    return out


class Models:
    """Loads each model once per audit (the base and the public LM are often the same model)."""

    def __init__(self):
        self._loaded: dict[str, tuple[torch.nn.Module, Any]] = {}

    def get(self, source) -> tuple[torch.nn.Module | None, Any]:
        if source is None or isinstance(source, torch.nn.Module):
            return load_reference(source)
        key = str(source)
        if key not in self._loaded:
            self._loaded[key] = load_reference(source)
        return self._loaded[key]


def load_reference(reference: str | Path | torch.nn.Module | None):
    """(model, tokenizer) of the public weights: None, a packaged name (smollm2), a local HF folder, or a model."""
    if reference is None:
        return None, None
    if isinstance(reference, torch.nn.Module):
        return reference.eval(), None
    from stip.models import load_plain_model, resolve_model

    path = resolve_model(reference)
    if not Path(path).exists():
        raise StipError(f"reference {reference!r}: no such model folder or packaged model (try smollm2)")
    try:
        model, tok = load_plain_model(reference)
    except (OSError, ValueError) as e:
        raise StipError(f"reference {reference!r} could not be loaded as a transformers causal LM: {e}") from None
    return model.eval(), tok  # load_plain_model loads float32 (GGUF models refuse .float())


def check_vocab(model: torch.nn.Module | None, source, vocab_size: int, what: str = "reference") -> None:
    if model is not None and int(model.get_input_embeddings().weight.shape[0]) != vocab_size:
        raise StipError(f"{what} {source!r} has a vocabulary of {model.get_input_embeddings().weight.shape[0]}"
                        f" tokens; the protected model has {vocab_size}: not its public weights")


def same_tokenizer(ours, theirs) -> bool:
    """Whether two tokenizers map text to the same ids (same vocabulary and special tokens)."""
    try:
        return ours.get_vocab() == theirs.get_vocab()
    except AttributeError:
        return False


def public_language_model(public_lm, levels: list[str], tokenizer, has_tokenizer: bool, vocab_size: int,
                          models: Models) -> tuple[torch.nn.Module | None, str]:
    """(the public LM or None, what the report says about it). `public_lm`: AUTO (the packaged model, loaded
    when level none is asked and its tokenizer is the protected model's), None / "none", a name, a folder or a
    model (its vocabulary must match; with a tokenizer, the same tokenizer)."""
    from stip.models import DEFAULT_MODEL

    if public_lm is None or public_lm == "none":
        return None, "none"
    auto = public_lm == AUTO
    if auto:
        if "none" not in levels:
            return None, "none (only level none loads one by default)"
        if not has_tokenizer:
            return None, f"none ({DEFAULT_MODEL}'s tokenizer is not this model's)"
        public_lm = DEFAULT_MODEL
    name = type(public_lm).__name__ if isinstance(public_lm, torch.nn.Module) else str(public_lm)
    try:
        model, tok = models.get(public_lm)
    except StipError:
        if auto:
            return None, f"none ({DEFAULT_MODEL} is not installed)"
        raise
    matches = int(model.get_input_embeddings().weight.shape[0]) == vocab_size and (
        not has_tokenizer or tok is None or same_tokenizer(tokenizer, tok))
    if not matches:
        if auto:
            return None, f"none ({DEFAULT_MODEL}'s tokenizer is not this model's)"
        raise StipError(f"public LM {name!r} does not share the protected model's tokenizer; deciphering needs "
                        f"the same token ids (give another with --public-lm, or --public-lm none)")
    return model.eval(), name
