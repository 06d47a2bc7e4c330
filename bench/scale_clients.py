"""The scale table's users: client processes (each one user of every row: the shipped `stip.Client`, or httpx
streaming vLLM's OpenAI server as a plain-vLLM user would), and plain HF `generate` timed token by token."""

from __future__ import annotations

import multiprocessing as mp
import time


def _plain_vllm_generate(http, url: str, model: str, prompt: list[int], n: int, stop: list[int]) -> dict:
    """One streamed completion from vLLM's OpenAI server, token ids in and out (it runs without a tokenizer)."""
    import json

    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0.0, "stream": True,
            "return_token_ids": True, "stop_token_ids": stop}
    ids: list[int] = []
    t0 = time.perf_counter()
    first = None
    with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"vLLM answered {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            got = json.loads(line[6:])["choices"][0].get("token_ids") or []
            if got and first is None:
                first = time.perf_counter()
            ids += got
    total = time.perf_counter() - t0
    per = (total - (first - t0)) / (len(ids) - 1) * 1e3 if first is not None and len(ids) > 1 else None
    return {"tokens": len(ids), "token_ids": ids, "total_ms": total * 1e3, "per_token_ms": per}


def _worker(prompt: list[int], k: int, stop: list[int], conn) -> None:
    """One user of every row: ("generate", (kind, where, url), n) with kind "stip" (where: a client bundle; the
    shipped `stip.Client`, round-trip or server-decode as the bundle says) or "vllm" (where: vLLM's model name).
    One process serves every row, so N processes cover the whole table (memory: each holds both client bundles)."""
    import torch

    torch.set_num_threads(1)
    import httpx

    import stip

    clients: dict = {}
    http = httpx.Client(timeout=600.0, trust_env=False)
    while (msg := conn.recv()) is not None:
        _, (kind, where, url), n = msg
        try:
            if kind == "vllm":
                conn.send(_plain_vllm_generate(http, url, where, prompt, n, stop))
                continue
            if (where, url) not in clients:
                clients[(where, url)] = stip.Client(where, url, k=k)
            g = clients[(where, url)].generate(ids=prompt, max_tokens=n)
            t = g.timing
            conn.send({"tokens": len(g.token_ids), "token_ids": g.token_ids, "total_ms": t.total_ms,
                       "per_token_ms": (t.total_ms - t.prefill_ms) / t.steps if t.steps else None})
        except Exception as e:  # the coordinator reports it; the worker stays for the next command
            conn.send({"error": f"{type(e).__name__}: {e}"})
    http.close()


def users(n: int, prompt: list[int], k: int, stop: list[int]):
    """`n` client processes (bench.concurrent.Users: spawned, released together) running `_worker`."""
    from bench.concurrent import Users

    class ScaleUsers(Users):
        def __init__(self):  # Users' release and shutdown, this module's worker
            ctx = mp.get_context("spawn")
            self.conns, self.procs = [], []
            for _ in range(n):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker, args=(prompt, k, stop, child), daemon=True)
                p.start()
                self.conns.append(parent)
                self.procs.append(p)

    return ScaleUsers()


class _Clock:
    """A `generate` streamer that notes when each new token arrives (the first call is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def plain_hf(model, prompt: list[int], batch: int, tokens: int) -> tuple[float, float | None, list[int]]:
    """`bench.concurrent.plain_batch` (greedy, exactly `tokens` new tokens for `batch` copies of the prompt), also
    timing its tokens: (seconds, ms per token after the first, the first row's tokens)."""
    import torch

    ids = torch.tensor([prompt] * batch)
    clock = _Clock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, streamer=clock,
                             pad_token_id=model.generation_config.pad_token_id or 0)
    seconds = time.perf_counter() - t0
    new = clock.times[1:]
    per = (new[-1] - new[0]) / (len(new) - 1) * 1e3 if len(new) > 1 else None
    return seconds, per, out[0, len(prompt):].tolist()
