"""Read a GGUF file's metadata once per load instead of once per transformers call.

transformers reads a GGUF checkpoint's config, weights and tokenizer in three calls (AutoConfig, AutoModel and
AutoTokenizer `.from_pretrained(gguf_file=...)`), and each makes its own `gguf.GGUFReader`, which parses every
metadata field in Python: for SmolLM2 its 49152-token vocabulary and 48900 merges, element by element, 2-3 s of CPU
each time. Loading the weights, transformers also builds gguf's tensor name map (every name of every block) once per
submodule of the model, about 400 times for SmolLM2. Inside `shared_gguf_readers()` transformers' readers are made
once per file and its name maps once per (architecture, blocks), and shared: both are only read (a reader is a
memory map and the parsed fields). transformers imports both names from gguf at each call, so gguf's names are
swapped while a block is open in any thread (a thread without a block of its own gets plain ones) and are gguf's
own again once none is.
"""

from __future__ import annotations

import contextlib
import os
import threading
from contextvars import ContextVar
from typing import Iterator

_CACHE: ContextVar[dict | None] = ContextVar("stip_gguf_readers", default=None)
_LOCK = threading.Lock()
_active = 0  # blocks open in any thread
_originals: dict = {}  # gguf's own functions, while they are swapped


def _shared(name: str, original, key):
    """`original(...)`, made once per `key(...)` in this thread's block (always anew outside one)."""
    def make(*args, **kw):
        cache = _CACHE.get()
        if cache is None:
            return original(*args, **kw)
        k = (name, key(*args, **kw))
        if k not in cache:
            cache[k] = original(*args, **kw)
        return cache[k]

    return make


@contextlib.contextmanager
def shared_gguf_readers(cache: dict | None = None) -> Iterator[dict]:
    """Within the block, transformers' GGUF loads in this thread share readers and name maps: `cache` (kept by the
    caller to share across blocks) or a new one, dropped at the end."""
    global _active
    import gguf

    with _LOCK:
        if _active == 0:
            _originals.update(GGUFReader=gguf.GGUFReader, get_tensor_name_map=gguf.get_tensor_name_map)
            gguf.GGUFReader = _shared("reader", gguf.GGUFReader,
                                      lambda path, mode="r": (os.path.realpath(path), mode))
            gguf.get_tensor_name_map = _shared("names", gguf.get_tensor_name_map,
                                               lambda arch, n_blocks: (arch, n_blocks))
        _active += 1
    token = _CACHE.set({} if cache is None else cache)
    try:
        yield _CACHE.get()
    finally:
        _CACHE.reset(token)
        with _LOCK:
            _active -= 1
            if _active == 0:
                gguf.GGUFReader, gguf.get_tensor_name_map = (_originals.pop("GGUFReader"),
                                                             _originals.pop("get_tensor_name_map"))
