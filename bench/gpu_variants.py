"""The GPU benchmark's model and variants: a random LLaMA of a given shape, and how each variant (plain HF
`generate`, our engine in process, vLLM offline, served through `stip serve`) is timed at each batch size."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # LlamaConfig arguments
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=256),
}


# ------------------------------------------------------------------------------------------------ the model


def build_model(shape: str, dtype: torch.dtype, device: str, folder: Path, seed: int = 0):
    """A LLaMA of the given shape with random weights (transformers' own init), saved to `folder`; (model, ids)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], bos_token_id=None, eos_token_id=None, pad_token_id=None,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(old)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    return model


def prompt_ids(vocab: int, length: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (length,), generator=g).tolist()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ plain variants


def plain_generate(model, prompt: list[int], batch: int, tokens: int, device: str) -> dict:
    """Plain HF `generate`, greedy, exactly `tokens` new tokens for `batch` copies of the prompt."""
    ids = torch.tensor([prompt] * batch, device=device)

    def run(n: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        _sync(device)
        return time.perf_counter() - t0

    run(2)  # warm-up
    first, total = run(1), run(tokens)
    return {"per_token_ms": (total - first) / max(1, tokens - 1) * 1e3, "tokens_per_s": batch * tokens / total,
            "seconds": total}


def plain_engine(model, prompt: list[int], batch: int, tokens: int, device: str) -> dict:
    """The unprotected model in our `BatchedEngine`: `batch` sessions prefilled in one tick, then one decode tick per
    token (greedy; embeddings from the plain table, as a client would send)."""
    from stip.server.batching import BatchedEngine
    from stip.server.engine import Step

    engine = BatchedEngine(model)
    table = model.get_input_embeddings().weight

    def embed(ids) -> torch.Tensor:
        return table[torch.as_tensor(ids, device=table.device)].detach()

    def run(n: int) -> tuple[float, list[float]]:
        states = [engine.new_state() for _ in range(batch)]
        _sync(device)
        t0 = time.perf_counter()
        out = engine.step_batch([Step(s, embed(prompt)) for s in states])
        ticks = []
        for _ in range(n - 1):
            nxt = [int(o[-1].argmax()) for o in out]
            _sync(device)
            t1 = time.perf_counter()
            out = engine.step_batch([Step(s, embed([t])) for s, t in zip(states, nxt)])
            _sync(device)
            ticks.append(time.perf_counter() - t1)
        _sync(device)
        seconds = time.perf_counter() - t0
        errors = [o for o in out if isinstance(o, BaseException)]
        for s in states:
            engine.free(s)
        if errors:
            raise errors[0]
        return seconds, ticks

    run(2)
    total, ticks = run(tokens)
    return {"per_token_ms": statistics.median(ticks) * 1e3 if ticks else None,
            "tokens_per_s": batch * tokens / total, "seconds": total}


VLLM_SCRIPT = r"""
import json, sys, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
cfg = json.loads(sys.argv[1])
llm = LLM(model=cfg["model"], dtype=cfg["dtype"], skip_tokenizer_init=True, enforce_eager=True,
          max_model_len=cfg["max_model_len"], **cfg.get("options", {}))
def run(batch, n):
    sp = SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
    t0 = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=cfg["prompt"])] * batch, sp, use_tqdm=False)
    return time.perf_counter() - t0
out = {}
for b in cfg["batches"]:
    run(b, 2)
    first, total = run(b, 1), run(b, cfg["tokens"])
    out[b] = {"per_token_ms": (total - first) / max(1, cfg["tokens"] - 1) * 1e3,
              "tokens_per_s": b * cfg["tokens"] / total, "seconds": total}
print("RESULT " + json.dumps(out))
"""


def plain_vllm(folder: Path, prompt: list[int], batches: list[int], tokens: int, dtype: str, device: str,
               timeout: float) -> dict[int, dict]:
    """vLLM's own offline engine on the unprotected checkpoint, in a process of its own (it takes the GPU)."""
    cfg = {"model": str(folder), "dtype": dtype, "prompt": prompt, "batches": batches, "tokens": tokens,
           "max_model_len": len(prompt) + tokens + 8}
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    if not device.startswith("cuda"):
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        cfg["options"] = {"distributed_executor_backend": "uni"}
    p = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, json.dumps(cfg)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise RuntimeError(f"vLLM exited with {p.returncode}: {(p.stderr or p.stdout)[-800:]}")
    return {int(b): r for b, r in json.loads(line[7:]).items()}


# ------------------------------------------------------------------------------------------------ served variants


def served(protected: Path, serve_args: list[str], prompt: list[int], batches: list[int], tokens: int,
           users) -> dict[int, dict]:
    """`stip serve PROTECTED/server ARGS` and `users` (bench.concurrent.Users) released together per batch size."""
    from stip.server.launch import local_server

    out = {}
    with local_server(protected / "server", *serve_args) as server:
        users.generate(max(batches), server.url, 2)  # warm-up: every client's first session, the server's kernels
        for b in batches:
            seconds, res = users.generate(b, server.url, tokens)
            per = [r["per_token_ms"] if r.get("per_token_ms") is not None else r["total_ms"] / max(1, r["tokens"])
                   for r in res]
            made = sum(r["tokens"] for r in res)
            out[b] = {"per_token_ms": statistics.median(per), "tokens_per_s": made / seconds, "seconds": seconds,
                      "tokens_per_client": sorted({r["tokens"] for r in res}),
                      "outputs": [r["token_ids"] for r in res]}
    return out



def vllm_available() -> bool:
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False
