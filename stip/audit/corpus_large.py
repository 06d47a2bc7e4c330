"""A public English corpus of several million tokens, for production-volume traffic (`python -m bench.decipher`):
large enough that both the users' text and the attacker's statistics reach a million tokens, and never overlap.

`stip.audit.corpus` (the `pydoc_data` topics, about 100k tokens) is too small for that. This adds the docstrings of
the Python standard library and of a few pure-documentation-rich packages that ship with the install (numpy, scipy,
networkx, matplotlib, sympy), read with `ast` (nothing is imported or run). No download; the text is fixed by the
Python and package versions installed (`sources()` records them).

Documents are the `pydoc_data` paragraphs (kept in `stip.audit.corpus`'s parts: its `public` part goes to the
attacker, its `prompts` part to the users, its `heldout` part nowhere) and one document per source file (its
docstrings). Paragraphs are whitespace-collapsed and deduplicated over the whole corpus (boilerplate repeated word
for word across files is kept once). Each file goes wholly to one side by a hash of its name, so no paragraph or
file is on both sides:

- `users`: what users send (the traffic), documents in a fixed pseudo-random order, so any prefix is a sample of
  every source;
- `attacker`: the public text the attacker's statistics come from.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import re
import sysconfig
from functools import lru_cache
from pathlib import Path

import numpy as np

PACKAGES = ("numpy", "networkx", "matplotlib", "scipy", "sympy")
USERS_SHARE = 0.4  # of the files (by hash); the rest is the attacker's
MIN_PARAGRAPH = 40  # characters


def _paragraphs(text: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if len(para) >= MIN_PARAGRAPH and not set(para) <= set("*=-~^:. "):
            out.append(para)
    return out


def _docstrings(path: Path) -> str:
    """Every module, class and function docstring of one source file, in file order ("" if it does not parse)."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return ""
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                docs.append(doc)
    return "\n\n".join(docs)


def _is_test(rel: Path) -> bool:
    return any(p in ("test", "tests", "testing", "idlelib", "lib2to3", "site-packages") for p in rel.parts[:-1])


def source_roots() -> dict[str, Path]:
    """Name -> folder of each docstring source that is installed: the standard library, then PACKAGES."""
    roots = {"stdlib": Path(sysconfig.get_paths()["stdlib"])}
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            roots[name] = Path(list(spec.submodule_search_locations)[0])
    return roots


def sources() -> dict[str, str]:
    """Name -> version of every source the corpus reads (the text depends on them)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python (pydoc_data, stdlib)": platform.python_version()}
    for name in source_roots():
        if name != "stdlib":
            try:
                out[name] = version(name)
            except PackageNotFoundError:
                out[name] = "?"
    return out


def side_of(key: str) -> str:
    """"users" or "attacker" for a document, by a hash of its name (stable across machines and runs)."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return "users" if (h % 1000) < USERS_SHARE * 1000 else "attacker"


def _cache_file() -> Path:
    """Where `documents()` is kept between runs (reading every docstring takes minutes on a small machine): the
    user's cache folder, under a name that changes with the sources' versions and these settings."""
    import json
    import os

    key = json.dumps([sources(), PACKAGES, USERS_SHARE, MIN_PARAGRAPH, 1], sort_keys=True)
    digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "stip" / f"corpus_large-{digest}.json.gz"


@lru_cache(maxsize=1)
def documents() -> dict[str, list[tuple[str, list[str]]]]:
    """{"users": [(name, paragraphs)], "attacker": [...]}: every document once, its paragraphs deduplicated
    (read from the cache when an earlier run left it)."""
    import gzip
    import json

    path = _cache_file()
    try:
        return {side: [(k, list(p)) for k, p in docs] for side, docs in json.loads(gzip.decompress(
            path.read_bytes())).items()}
    except (OSError, ValueError):
        pass
    out = _read_documents()
    try:
        from stip.common.files import write_bytes_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, gzip.compress(json.dumps(out).encode()))
    except OSError:
        pass  # no cache: the next run reads the sources again
    return out


def _read_documents() -> dict[str, list[tuple[str, list[str]]]]:
    from stip.audit.corpus import split

    parts = split()
    seen: set[str] = set()
    out: dict[str, list[tuple[str, list[str]]]] = {"users": [], "attacker": []}
    for side, part in (("attacker", "public"), ("users", "prompts")):
        for i, para in enumerate(parts[part]):
            if para not in seen:
                seen.add(para)
                out[side].append((f"pydoc/{part}/{i}", [para]))
    for name, root in source_roots().items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if _is_test(rel):
                continue
            paras = [p for p in _paragraphs(_docstrings(path)) if p not in seen]
            seen.update(paras)
            if paras:
                key = f"{name}/{rel.as_posix()}"
                out[side_of(key)].append((key, paras))
    order = lambda doc: hashlib.blake2b(doc[0].encode(), digest_size=8).digest()  # noqa: E731
    out["users"].sort(key=order)
    return out


def token_stream(tokenizer, side: str, max_tokens: int | None = None) -> np.ndarray:
    """One side's documents tokenized (no special tokens; paragraphs end with a blank line) and concatenated, as
    an int64 array, cut to `max_tokens`."""
    ids: list[int] = []
    batch: list[str] = []

    def flush():
        if batch and hasattr(tokenizer, "batch_decode"):  # a transformers tokenizer: one batched call
            for row in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                ids.extend(row)
        for text in batch if not hasattr(tokenizer, "batch_decode") else ():
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        batch.clear()

    for _, paras in documents()[side]:
        batch.extend(p + "\n\n" for p in paras)
        if len(batch) >= 512:
            flush()
            if max_tokens is not None and len(ids) >= max_tokens:
                break
    flush()
    return np.asarray(ids[:max_tokens] if max_tokens else ids, dtype=np.int64)
