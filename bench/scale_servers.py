"""The scale table's servers: `stip serve` per STIP row, vLLM's OpenAI server on a plain checkpoint, all started
side by side."""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

VLLM_STARTUP_S = 400.0
# Small for a shared CPU machine: a 1 GiB KV cache per vLLM server; sequences up to MAX_MODEL_LEN tokens.
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
MAX_MODEL_LEN = 1024


def save_plain_checkpoint(model, folder: Path) -> Path:
    """The unprotected model as a plain safetensors checkpoint for vLLM (a GGUF-loaded model refuses
    `save_pretrained`: its config still names the GGUF quantization, though the weights are dequantized)."""
    import copy

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]  # vLLM picks its model class by it; GGUF configs lack it
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):  # stored once, as the input embedding (what loaders read)
        state.pop("lm_head.weight", None)
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


def plain_vllm_server(python: str, model_dir: Path):
    """vLLM's own OpenAI server on the plain checkpoint, token ids only, on every CPU this process may use."""
    from stip.server.launch import local_process

    cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    env = dict(VLLM_ENV, VLLM_CPU_OMP_THREADS_BIND=cpus, VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    return local_process(lambda port: [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                                       "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
                                       "--skip-tokenizer-init", "--dtype", "float32", "--max-model-len",
                                       str(MAX_MODEL_LEN), "--disable-log-stats"],
                         "/health", env=env, timeout=VLLM_STARTUP_S)


def stip_server(python: str, bundle_dir: Path, args: tuple[str, ...], threads: int, vllm: bool):
    """`stip serve BUNDLE/server ARGS` (with `--threads`, unless the engine is vLLM) on a free loopback port."""
    from stip.server.launch import local_process

    extra = [] if vllm else ["--threads", str(threads)]
    return local_process(lambda port: [python, "-m", "stip.cli", "serve", str(bundle_dir / "server"), "--host",
                                       "127.0.0.1", "--port", str(port), *extra, *args],
                         "/health", env=VLLM_ENV if vllm else None,
                         timeout=VLLM_STARTUP_S if vllm else 180.0)


def start_all(stack: contextlib.ExitStack, launchers: dict) -> dict:
    """Enter every server's context side by side (vLLM takes half a minute or more to start); stop them all on
    exit, and all that started if one fails."""
    started, errors = {}, []
    with ThreadPoolExecutor(max(1, len(launchers))) as pool:
        futures = {label: pool.submit(cm.__enter__) for label, cm in launchers.items()}
        for label, future in futures.items():
            try:
                started[label] = future.result()
            except BaseException as e:  # noqa: BLE001 - stop the others, then report
                errors.append(e)
                continue
            stack.push(launchers[label].__exit__)
    if errors:
        raise errors[0]
    return started
