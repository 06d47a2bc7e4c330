"""Per-token latency of TEE mode against plain STIP round-trip mode, in one run, on one machine, with a breakdown.

    .venv/bin/python -m bench.tee_latency                    # SmolLM2-135M-Instruct, writes bench/results/tee/latency.*
    .venv/bin/python -m bench.tee_latency --tiny --out /tmp/x  # a tiny random LLaMA (the test's run)

The model protected twice, once plainly (`stip protect`, the round-trip baseline) and once with `--tee` (its
DIR/server is the TEE worker bundle, which a round-trip `stip serve` refuses); three real processes on loopback
started once: `stip serve PLAIN/server` (round-trip mode), `stip serve TEE/server --tee-worker` and
`stip enclave TEE/enclave` beside it. Variants, run
interleaved (ABC CBA ...) for `--repeats` rounds, greedy, the same prompt:
  round_trip      stip.Client -> stip serve, top-k downlink: what users run today;
  tee             TeeClient -> stip enclave -> worker: TEE mode as users run it (attestation + channel per generation);
  tee_in_process  (extra) the enclave's part (EnclaveModel) in this process over the same worker's WebSocket: the
                  one place every enclave<->worker message can be timed and counted, so the breakdown comes from it.
Per-token figures are decode steps only ((total - time to first token) / steps); prefill is apart. Medians with the
range over repeats; ratios against round_trip's median. The breakdown per decode token: enclave compute (embedding,
block 0's non-linear parts, final norm, un-permuting; the pads' hit rate in the pool, and what inline pads would
cost, measured apart on the same shapes), worker compute (as the worker reports it in each reply, padded linears and
body apart), the enclave-worker channel (each message's wall time minus the worker's reported compute), and
messages and tensor bytes per token. Then, on the same parties: N clients at once in each mode for each N of
`--clients` (default 8; bench.tee_concurrent, with the pad pool's hit rate under that load), and the lossless check
(bench.tee_lossless: the enclave's logits against the plain model's at every timed step, and greedy equality). The
record names the commit and whether the tree was clean, the machine, and the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from bench import tee_concurrent, tee_lossless

PROMPT = "Explain in one paragraph why the sky is blue."
TINY = "llama-gqa-untied"
WORKER_TOKEN = "bench-worker-token"
VARIANTS = ("round_trip", "tee", "tee_in_process")
PAPER = "+2.6% to +9.4% per token (STIP paper, TEE in the first and last layers, GPU, pads precomputed)"


def protect(model: str, folder: Path) -> tuple[Path, Path, list[int]]:
    """Protect `model` twice: plainly into `folder/round-trip` (the baseline's server bundle) and with `--tee` into
    `folder/protected` (whose server bundle is the TEE worker's); (round-trip folder, TEE folder, prompt ids)."""
    import stip

    if model == "smollm2":
        from stip.models import resolve_model

        source = resolve_model("smollm2")
    else:
        from tests.models import save_tiny

        source = save_tiny(model, folder / "plain")
    stip.protect(source, folder / "round-trip", progress=False)
    stip.protect(source, folder / "protected", progress=False, tee=True)
    if model != "smollm2":
        return folder / "round-trip", folder / "protected", [3, 14, 15, 9, 26, 5, 35, 8] * 4
    from stip.client.bundle import ClientBundle

    tok = ClientBundle.load(folder / "protected" / "client").tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    return folder / "round-trip", folder / "protected", list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@contextlib.contextmanager
def parties(plain: Path, out: Path, threads: int, pad_pool_mib: int | None = None):
    """The round-trip server (on `plain`), the TEE worker and the enclave (on `out`), each its own process:
    (server, worker, enclave)."""
    from bench.scale_servers import start_all
    from stip.server.launch import local_process
    from tests.parties import serve

    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def enclave_cmd(port):
        return [sys.executable, "-m", "stip.cli", "enclave", str(out / "enclave"), "--worker", worker.url,
                "--port", str(port), "--log-level", "warning",
                *([] if pad_pool_mib is None else ["--pad-pool-mib", str(pad_pool_mib)])]

    with contextlib.ExitStack() as stack:  # the server and the worker start side by side, the enclave then
        started = start_all(stack, {"server": serve(plain, "--expose-timing", threads=threads),
                                    "worker": serve(out, "--tee-worker", token=WORKER_TOKEN, threads=threads)})
        worker = started["worker"]
        enclave = stack.enter_context(local_process(enclave_cmd, "/health",
                                                    env={"STIP_WORKER_TOKEN": WORKER_TOKEN, **env}))
        yield started["server"], worker, enclave


def _counting_link(url: str):
    """The enclave's WebSocketWorkerLink, counting each message's wall time, the worker's reported compute and the
    tensor bytes each way, per op ("linear" or "body")."""
    from stip.enclave.worker_link import WebSocketWorkerLink

    class CountingLink(WebSocketWorkerLink):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.stats = Counter()

        def _call(self, header, x=None):
            s0, w0 = self.calls_s, self.worker_ms
            head, payload = super()._call(header, x)
            op = header["op"]
            self.stats[f"{op}.messages"] += 1
            self.stats[f"{op}.wall_ms"] += (self.calls_s - s0) * 1e3
            self.stats[f"{op}.worker_ms"] += self.worker_ms - w0
            self.stats["bytes_up"] += 0 if x is None else x.numel() * x.element_size()
            self.stats["bytes_down"] += len(payload)
            return head, payload

    return CountingLink(url, token=WORKER_TOKEN)


def pad_cost_ms(model, reps: int = 20) -> float:
    """What the enclave would spend per decode token on pads made inline (a dry pool): drawing `r` and computing
    `W r` for every offloaded request (block 0's and the LM head), timed apart on one row of each linear's input
    shape. With the pool full the step only copies them out."""
    linears = model.offloaded()  # one per request: a group (q/k/v, gate/up) shares one pad, one `W r`
    t0 = time.perf_counter()
    for _ in range(reps):
        for m in linears:
            r = model.pads.draw((1, m.weight64.shape[1]), m.bound)
            _ = r @ m.weight64.t()
    return (time.perf_counter() - t0) * 1e3 / reps


class Bench:
    """The three variants against the running parties; each `run_*` does one greedy generation of `tokens`."""

    def __init__(self, plain: Path, out: Path, server, worker, enclave, ids: list[int], tokens: int,
                 pool_bytes: int | None = None):
        from stip.client.sdk import Client
        from stip.client.tee import TeeClient
        from stip.developer.tee import read_enclave_tensors
        from stip.enclave.compute import EnclaveModel

        self.ids, self.tokens = ids, tokens
        self.plain, self.out, self.server, self.enclave = plain, out, server, enclave  # for bench.tee_concurrent
        self.client = Client(plain / "client", server.url)
        self.tee_client = TeeClient(out / "tee-client", enclave.url, allow_simulated=True)
        config, tensors = read_enclave_tensors(out)  # the sealed enclave bundle, as `stip enclave` opens it
        self.link = _counting_link(worker.url)
        self.model = EnclaveModel.from_tensors(config, tensors, self.link,
                                               **({} if pool_bytes is None else {"pool_bytes": pool_bytes}))
        self.pad_ms = pad_cost_ms(self.model)

    def round_trip(self) -> dict:
        g = self.client.generate(ids=self.ids, max_tokens=self.tokens)
        t = g.timing
        return {"ids": g.token_ids, "steps": t.steps, "prefill_ms": t.prefill_ms,
                "per_token_ms": (t.total_ms - t.prefill_ms) / max(1, t.steps),
                "server_ms_per_token": t.server_ms_per_token, "wire_ms_per_token": t.wire_ms_per_token,
                "client_ms_per_token": t.client_ms_per_token}

    def tee(self) -> dict:
        t0 = time.perf_counter()
        self.tee_client.attest()  # what one attestation costs (every generation does one, inside its prefill)
        attest_ms = (time.perf_counter() - t0) * 1e3
        g = self.tee_client.generate(ids=self.ids, max_tokens=self.tokens)
        t, tee = g.timing, g.glimpse["tee"]
        return {"ids": g.token_ids, "steps": t.steps, "prefill_ms": t.prefill_ms, "attest_ms": attest_ms,
                "per_token_ms": (t.total_ms - t.prefill_ms) / max(1, t.steps), "total_ms": t.total_ms,
                # the enclave's own split of the whole generation (prefill and decode together)
                "enclave_ms": tee.get("enclave_ms", 0.0), "worker_link_ms": tee.get("worker_ms", 0.0),
                "pad_hit_rate": _rate(tee.get("pad_hits", 0), tee.get("pad_misses", 0)),
                "client_and_channel_ms": t.total_ms - tee.get("enclave_ms", 0.0) - tee.get("worker_ms", 0.0)}

    def tee_in_process(self) -> dict:
        m, link = self.model, self.link
        s = m.new_session()
        t0 = time.perf_counter()
        ids = [int(m.prefill(s, self.ids).argmax())]
        prefill_ms = (time.perf_counter() - t0) * 1e3
        e0, before, pads0 = s.timings["enclave_s"], Counter(link.stats), m.pads.stats()
        t0 = time.perf_counter()
        for _ in range(self.tokens - 1):
            ids.append(int(m.decode(s, ids[-1]).argmax()))
        total = (time.perf_counter() - t0) * 1e3
        pads = m.pads.stats()
        m.close(s)
        n = max(1, self.tokens - 1)
        d = {k: (v - before.get(k, 0)) / n for k, v in link.stats.items() if k != "close.messages"}
        d = {k: v for k, v in d.items() if not k.startswith("close.")}
        worker = d.get("linear.worker_ms", 0.0) + d.get("body.worker_ms", 0.0)
        wall = d.get("linear.wall_ms", 0.0) + d.get("body.wall_ms", 0.0)
        enclave = (s.timings["enclave_s"] - e0) * 1e3 / n
        return {"ids": ids, "steps": n, "prefill_ms": prefill_ms, "per_token_ms": total / n,
                "enclave_ms_per_token": enclave, "enclave_pad_ms_per_token": self.pad_ms,
                "pad_hit_rate": _rate(pads["hits"] - pads0["hits"], pads["misses"] - pads0["misses"]),
                "worker_ms_per_token": worker, "worker_linear_ms_per_token": d.get("linear.worker_ms", 0.0),
                "worker_body_ms_per_token": d.get("body.worker_ms", 0.0),
                "channel_ms_per_token": wall - worker,
                "unaccounted_ms_per_token": total / n - enclave - wall,
                "messages_per_token": d.get("linear.messages", 0.0) + d.get("body.messages", 0.0),
                "linear_messages_per_token": d.get("linear.messages", 0.0),
                "bytes_up_per_token": d.get("bytes_up", 0.0), "bytes_down_per_token": d.get("bytes_down", 0.0)}

    def close(self) -> None:
        self.model.shutdown()
        self.link.shutdown()


def _rate(hits: int, misses: int) -> float:
    """Pad rows served from the pool over all pad rows (1.0 without any: nothing was missed)."""
    return hits / (hits + misses) if hits + misses else 1.0


def _summary(runs: list[dict], keys) -> dict:
    out = {}
    for k in keys:
        vals = [r[k] for r in runs if k in r]
        if vals:
            out[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return out


def run(model: str, tokens: int, repeats: int, threads: int, log=print, pad_pool_mib: int | None = None,
        clients: tuple[int, ...] = ()) -> dict:
    """Protect, start the parties, run the variants interleaved; the results (JSON-ready)."""
    from bench.suite import tree_state

    load_start = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="stip-tee-bench-") as tmp:
        t0 = time.perf_counter()
        plain, out, ids = protect(model, Path(tmp))
        log(f"protected {model} twice (plain for the round trip, --tee for TEE mode) in "
            f"{time.perf_counter() - t0:.1f} s; starting the three processes")
        with parties(plain, out, threads, pad_pool_mib) as (server, worker, enclave):
            b = Bench(plain, out, server, worker, enclave, ids, tokens,
                      None if pad_pool_mib is None else pad_pool_mib << 20)
            lm_head = "enclave (tied: the enclave's own matmul)" if b.model.lm_head_local else \
                "worker (untied: padded, input mask)"
            try:
                for v in VARIANTS:  # warm-up, not counted
                    getattr(b, v)()
                first = b.round_trip()
                b.tokens = max(2, len(first["ids"]))  # it may stop at EOS: every variant then runs as many
                runs = {v: [] for v in VARIANTS}
                for r in range(repeats):
                    order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
                    for v in order:
                        runs[v].append(getattr(b, v)())
                    log(f"round {r + 1}/{repeats} ({' '.join(order)}): " + ", ".join(
                        f"{v} {runs[v][-1]['per_token_ms']:.1f} ms/token" for v in VARIANTS))
                concurrent = tee_concurrent.measure(b, list(clients), b.tokens, repeats, log)
                lossless = tee_lossless.check(b.model, tee_lossless.plain_model(model), ids,
                                              runs["tee_in_process"][0]["ids"])
                log(f"lossless: {lossless}")
            finally:
                b.close()
    ids_by = {v: [x.pop("ids") for x in runs[v]] for v in VARIANTS}
    reference = ids_by["round_trip"][0]
    same = all(i[:len(reference)] == reference for v in VARIANTS for i in ids_by[v])
    summary = {v: _summary(runs[v], runs[v][0].keys()) for v in VARIANTS}
    base = summary["round_trip"]["per_token_ms"]["median"]
    ratios = {v: summary[v]["per_token_ms"]["median"] / base for v in VARIANTS[1:]}
    return {"model": model, "prompt_tokens": len(ids), "lm_head": lm_head,
            "protected": "twice: plainly for the round trip, with --tee for TEE mode (its server bundle is the TEE "
                         "worker's, which a round-trip server refuses)", "decode_steps": runs["round_trip"][0]["steps"],
            "repeats": repeats, "order": "interleaved, ABC then CBA (round i reversed when i is odd)",
            "pad_pool_mib": "the enclave's default (256)" if pad_pool_mib is None else pad_pool_mib,
            "concurrent": concurrent, "lossless": lossless,
            "command": " ".join([Path(sys.executable).name, "-m", "bench.tee_latency", *sys.argv[1:]]),
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpus": os.cpu_count(), "torch": torch.__version__,
                        "load_average_start": load_start, "load_average": list(os.getloadavg())},
            "threads": threads, "git": tree_state(), "same_tokens": same,
            "ratio_vs_round_trip": ratios, "summary": summary, "runs": runs, "paper": PAPER}


def _load(machine: dict) -> str:
    start = machine.get("load_average_start")
    end = f"{machine['load_average'][0]:.1f} at the end"
    return end if start is None else f"{start[0]:.1f} at the start, {end}"


def _ms(s: dict) -> str:
    return f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"


def markdown(r: dict) -> str:
    s, g = r["summary"], r["git"]
    rt, tee, ip = s["round_trip"], s["tee"], s["tee_in_process"]
    med = {k: v["median"] for k, v in ip.items()}
    lines = [
        f"# TEE mode latency: {r['model']}",
        "",
        f"`{r['command']}` on {r['machine']['platform']} ({r['machine']['cpus']} CPUs, {r['threads']} torch "
        f"thread(s) per process, load average {_load(r['machine'])}), commit "
        f"{g.get('commit', '?')[:12]}{'' if g.get('clean') else ' (DIRTY TREE - not for committing)'}. "
        f"Prompt {r['prompt_tokens']} tokens, {r['decode_steps']} decode steps, greedy, {r['repeats']} interleaved "
        f"rounds; medians (min-max). Same tokens in every variant: {r['same_tokens']}. The model was protected "
        f"{r['protected']}. LM head: {r['lm_head']}.",
        "",
        "| variant | ms per decode token | prefill ms | vs round trip |",
        "|---|---|---|---|",
        f"| round trip (stip.Client -> stip serve, top-k downlink) | {_ms(rt['per_token_ms'])} | "
        f"{_ms(rt['prefill_ms'])} | 1.00 |",
        f"| TEE (TeeClient -> stip enclave -> worker) | {_ms(tee['per_token_ms'])} | {_ms(tee['prefill_ms'])} "
        f"(incl. attestation {tee['attest_ms']['median']:.1f}) | {r['ratio_vs_round_trip']['tee']:.2f} |",
        f"| TEE, enclave part in process (extra row: the breakdown's source) | {_ms(ip['per_token_ms'])} | "
        f"{_ms(ip['prefill_ms'])} | {r['ratio_vs_round_trip']['tee_in_process']:.2f} |",
        "",
        "Breakdown per decode token, TEE mode (enclave part in process, medians):",
        "",
        "| part | ms |",
        "|---|---|",
        f"| enclave compute | {med['enclave_ms_per_token']:.1f} |",
        f"| - pads: from the pool (hit rate {med['pad_hit_rate']:.3f}; TEE row {tee['pad_hit_rate']['median']:.3f}); "
        f"inline, as on a miss, they would cost (measured apart) | {med['enclave_pad_ms_per_token']:.1f} |",
        f"| worker compute | {med['worker_ms_per_token']:.1f} |",
        f"| - padded linears (block 0 in secret bases; an untied LM head) | "
        f"{med['worker_linear_ms_per_token']:.1f} |",
        f"| - body (blocks 1..L-1) | {med['worker_body_ms_per_token']:.1f} |",
        f"| enclave-worker channel (message wall time - worker compute) | {med['channel_ms_per_token']:.1f} |",
        f"| unaccounted (loop, argmax) | {med['unaccounted_ms_per_token']:.1f} |",
        "",
        f"Enclave-worker messages per token: {med['messages_per_token']:.0f} "
        f"({med['linear_messages_per_token']:.0f} padded-linear requests + 1 body); tensor bytes per token: "
        f"{med['bytes_up_per_token'] / 1024:.1f} KiB to the worker, {med['bytes_down_per_token'] / 1024:.1f} KiB "
        f"back. Round trip for comparison: server {rt['server_ms_per_token']['median']:.1f} ms, wire "
        f"{rt['wire_ms_per_token']['median']:.1f} ms, client {rt['client_ms_per_token']['median']:.1f} ms per token.",
        "",
        *tee_lossless.markdown(r.get("lossless")),
        *tee_concurrent.markdown(r.get("concurrent", {})),
        "",
        f"The paper: {r['paper']}. What differs here: the offloaded linears run in float64; each group of "
        "offloaded linears is one enclave-worker round trip; the pad pool's background thread (pool: "
        f"{r.get('pad_pool_mib', '?')} MiB) refills while the enclave waits for the worker's body, on the same CPU "
        "cores; and all of it on CPU processes sharing the same cores, not an enclave beside a GPU.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="smollm2 (default), or a tiny config name from tests/models.py")
    ap.add_argument("--tiny", action="store_true", help=f"the tiny random {TINY} (the test's run)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per run (fewer if EOS comes first)")
    ap.add_argument("--repeats", type=int, default=4, help="interleaved rounds of all variants")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every process (this one included)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/tee"), help="folder for latency.json/.md")
    ap.add_argument("--clients", type=int, nargs="*", default=[8], help="also N clients at once, TEE against "
                    "round trip, for each N given (default 8; none: skip)")
    ap.add_argument("--pad-pool-mib", type=int, default=None, help="the enclave's pad pool (0: pads inline; "
                    "default: the enclave's default)")
    a = ap.parse_args(argv)
    if a.tokens < 2 or a.repeats < 1 or a.threads < 1 or any(n < 1 for n in a.clients):
        ap.error("--tokens must be at least 2, --repeats, --threads and --clients at least 1")
    model = a.model or (TINY if a.tiny else "smollm2")
    torch.set_num_threads(a.threads)
    result = run(model, a.tokens, a.repeats, a.threads, log=lambda m: print(m, file=sys.stderr, flush=True),
                 pad_pool_mib=a.pad_pool_mib, clients=tuple(a.clients))
    write(result, a.out)
    print(markdown(result))


def write(result: dict, folder: Path) -> list[Path]:
    """latency.json and latency.md (latency-MODEL.* for other models) in `folder`, each written whole or not at all
    (bench/tee_extraction.py writes its own names beside them)."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = "latency" if result["model"] == "smollm2" else f"latency-{result['model']}"
    paths = []
    for name, text in ((f"{stem}.json", json.dumps(result, indent=1) + "\n"), (f"{stem}.md", markdown(result))):
        tmp = folder / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(folder / name)
        paths.append(folder / name)
    return paths


if __name__ == "__main__":
    main()
