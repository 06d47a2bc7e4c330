"""Parse a GGUF file once per load instead of once per transformers call.

transformers reads a GGUF checkpoint's config, weights and tokenizer in three calls (AutoConfig, AutoModel and
AutoTokenizer `.from_pretrained(gguf_file=...)`), and each makes its own `gguf.GGUFReader`, which parses every
metadata field in Python: for SmolLM2 its 49152-token vocabulary and 48900 merges, element by element, 2-3 s of CPU
each time. Inside `shared_gguf_readers()` the readers transformers makes are made once per file and shared (a reader
only reads: a memory map and the parsed fields); once no block is open, `gguf.GGUFReader` is gguf's own class again.
"""

from __future__ import annotations

import contextlib
import os
import threading
from contextvars import ContextVar
from typing import Iterator

_CACHE: ContextVar[dict | None] = ContextVar("stip_gguf_readers", default=None)
_LOCK = threading.Lock()
_active = 0  # blocks open in any thread: gguf.GGUFReader is the sharing constructor while one is


def _sharing(original):
    """A GGUFReader constructor that reuses this thread's block's readers (a plain one in a thread with none)."""
    def reader(path, mode="r"):
        cache = _CACHE.get()
        if cache is None:
            return original(path, mode)
        key = (os.path.realpath(path), mode)
        if key not in cache:
            cache[key] = original(path, mode)
        return cache[key]

    reader.original = original
    return reader


@contextlib.contextmanager
def shared_gguf_readers(cache: dict | None = None) -> Iterator[dict]:
    """Within the block, transformers' GGUF loads in this thread share one reader per file: `cache` (kept by the
    caller to share across blocks) or a new one, dropped at the end. transformers imports GGUFReader from gguf at
    each call, so gguf's name is swapped while a block is open, and gguf's own class is back once none is."""
    global _active
    import gguf

    with _LOCK:
        if _active == 0:
            gguf.GGUFReader = _sharing(gguf.GGUFReader)
        _active += 1
    token = _CACHE.set({} if cache is None else cache)
    try:
        yield _CACHE.get()
    finally:
        _CACHE.reset(token)
        with _LOCK:
            _active -= 1
            if _active == 0:
                gguf.GGUFReader = gguf.GGUFReader.original
