"""Public English text that ships with Python itself (the `pydoc_data` topics, about 460 KB), split three ways so
no part is both the attacker's statistics and the users' prompts: no download, same text on every machine.

- `public`: what the attacker knows (frequency statistics, fine-tuning data);
- `prompts`: what users send (the audit's requests), never in `public`;
- `heldout`: perplexity and top-1 agreement, in neither.
"""

from __future__ import annotations

import re
from functools import lru_cache


@lru_cache(maxsize=1)
def _paragraphs() -> tuple[str, ...]:
    import pydoc_data.topics as topics

    paras = []
    for name in sorted(topics.topics):
        for para in re.split(r"\n\s*\n", topics.topics[name]):
            text = " ".join(para.split())
            if len(text) >= 80 and not set(text) <= set("*=-~^ "):
                paras.append(text)
    return tuple(paras)


def split() -> dict[str, list[str]]:
    """{"public", "prompts", "heldout"}: paragraphs by index mod 10 (0-6 public, 7-8 prompts, 9 heldout)."""
    parts = {"public": [], "prompts": [], "heldout": []}
    for i, para in enumerate(_paragraphs()):
        parts["public" if i % 10 < 7 else "prompts" if i % 10 < 9 else "heldout"].append(para)
    return parts


def token_ids(tokenizer, part: str, max_tokens: int | None = None):
    """The part's paragraphs tokenized and concatenated (no special tokens), as a 1-D int64 tensor."""
    import torch

    ids: list[int] = []
    for para in split()[part]:
        ids.extend(tokenizer(para + "\n\n", add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.int64)
