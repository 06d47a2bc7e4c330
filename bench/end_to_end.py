"""End to end: plain transformers `generate` against STIP (a real `stip serve` process and the client), per token.

Variants, interleaved round by round (the order rotates each round):

* plain: `model.generate` in this process, greedy, the unprotected model fed token ids. Per-token latency comes from
  a streamer's timestamps (one `put` per generated token).
* stip-logits / stip-topk: the client loop of `stip.Client` (embed in the secret basis, one round trip per token,
  un-permute, pick greedily, detokenize), on `RemoteSession` directly so that every step is recorded, with the full
  logits downlink (V float32) or the top-k downlink (k (index, value) pairs). Over loopback, and over each simulated
  network of `bench.netsim` (a relay process between client and server).

A STIP step (one generated token) is timed from the moment the previous reply is in hand to the moment this one is:
pick + embed + encode + round trip + decode the reply. It splits exactly into
  server = `server_ms` the server reports (payload -> tensor, forward, top-k, reply bytes),
  wire   = round trip - server (network, WebSocket framing, the server's event loop),
  client = step - round trip (un-permuting, sampling, detokenizing, embedding, frame encoding/decoding).
Bytes per token are the WebSocket message payloads of one decode step, each way.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path

import torch



@contextlib.contextmanager
def stip_server(server_dir: Path, threads: int, timeout: float = 180.0):
    """`stip serve` as its own process on a free loopback port (`stip.server.launch`); yields (url, port)."""
    from stip.server.launch import local_server

    with local_server(server_dir, "--threads", str(threads), timeout=timeout) as server:
        yield server.url, server.port


# ------------------------------------------------------------------------------------------------ one generation


def plain_generation(model, prompt_ids: list[int], n_tokens: int) -> dict:
    """Greedy `generate` of exactly n_tokens (EOS masked until then); per-token gaps from streamer timestamps."""
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.t: list[float] = []
            self.ids: list[int] = []

        def put(self, value):
            self.t.append(time.perf_counter())
            self.ids.append(value.reshape(-1).tolist())

        def end(self):
            pass

    ids = torch.tensor([prompt_ids])
    stamps = Stamps()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens,
                             min_new_tokens=n_tokens, do_sample=False, streamer=stamps,
                             pad_token_id=model.generation_config.pad_token_id or 0)
    total = time.perf_counter() - t0
    t = stamps.t  # t[0]: the prompt was put; t[1]: first generated token; t[i]: i-th
    return {"ttft_ms": (t[1] - t0) * 1e3, "total_ms": total * 1e3,
            "steps": [{"total_ms": (b - a) * 1e3} for a, b in zip(t[1:], t[2:])],
            "tokens": out[0, len(prompt_ids):].tolist()}


def stip_generation(url: str, bundle, prompt_ids: list[int], n_tokens: int, downlink) -> dict:
    """The client's loop (as in `stip.Client`), recording every decode step."""
    from stip.client.sampling import Sampler, SamplingParams
    from stip.client.sdk import Detokenizer, pick_token
    from stip.client.transport import Connection

    tokenizer = bundle.tokenizer if bundle.has_tokenizer else None
    sampler = Sampler(SamplingParams(max_tokens=n_tokens), prompt_ids)
    detok = Detokenizer(tokenizer, prompt_ids) if tokenizer is not None else None
    out: list[int] = []
    steps = []
    with Connection(url).open_session() as session:
        t0 = time.perf_counter()
        x = bundle.embed(torch.tensor(prompt_ids), start=0)
        r = session.prefill(x, positions="last", downlink=downlink)
        ttft = (time.perf_counter() - t0) * 1e3
        prefill = {"server_ms": r.server_ms, "rtt_ms": r.rtt_ms, "bytes_sent": r.bytes_sent,
                   "bytes_received": r.bytes_received}
        pos = len(prompt_ids)
        for i in range(n_tokens):
            c0 = time.perf_counter()
            token = pick_token(bundle, sampler, r)
            out.append(token)
            sampler.observe(token)
            if detok is not None:
                detok.push(token)
            if i == n_tokens - 1:
                break
            x = bundle.embed(torch.tensor([token]), start=pos)
            r = session.decode(x, downlink=downlink)
            pos += 1
            total = (time.perf_counter() - c0) * 1e3
            steps.append({"total_ms": total, "client_ms": total - r.rtt_ms, "server_ms": r.server_ms,
                          "wire_ms": r.rtt_ms - r.server_ms, "rtt_ms": r.rtt_ms,
                          "bytes_up": r.bytes_sent, "bytes_down": r.bytes_received})
    return {"ttft_ms": ttft, "prefill": prefill, "steps": steps, "tokens": out}


# ------------------------------------------------------------------------------------------------ the benchmark


def _same_tokens(ref: list[int], got: list[int], eos: set[int]) -> bool:
    """Greedy outputs agree before the first EOS STIP picks (the plain run masks EOS until its last token)."""
    n = next((i for i, t in enumerate(got) if t in eos), len(got))
    return ref[:n] == got[:n]


def run(plain_model, bundle, server_dir: Path, prompt_ids: list[int], settings: dict, profiles: list,
        log=print) -> dict:
    """Plain vs STIP over loopback and over each `profiles` network; returns a JSON-serialisable dict."""
    from bench import netsim
    from bench.report import paired, summarize
    from stip.client.transport import Downlink

    n_tokens, rounds, k = settings["tokens"], settings["rounds"], settings["topk"]
    threads = torch.get_num_threads()
    client_threads = settings.get("client_threads", 1)
    downlinks = {"logits": Downlink(kind="logits"), "topk": Downlink(kind="topk", k=k)}
    eos = set(bundle.eos_token_ids)
    calibration = {}
    for p in profiles:
        calibration[p.name] = netsim.calibrate(p)
        log(f"  netsim {p.name}: configured {p.rtt_ms} ms RTT, {p.mbit} Mbit/s; measured {calibration[p.name]}")

    with contextlib.ExitStack() as stack:
        url, port = stack.enter_context(stip_server(server_dir, threads))
        urls = {"loopback": url}
        for p in profiles:
            relay_port = stack.enter_context(netsim.relay_process(port, p))
            urls[p.name] = f"http://127.0.0.1:{relay_port}"
        variants = [("plain", "in-process", None)] + [(f"stip-{d}", net, d) for net in urls for d in downlinks]

        def once(name, net, dl):
            if name == "plain":
                return plain_generation(plain_model, prompt_ids, n_tokens)
            # The client's work per token is a gather and a k- or V-sized pick: one thread, so that its idle
            # thread pool never competes with the server's threads for this machine's cores.
            torch.set_num_threads(client_threads)
            try:
                return stip_generation(urls[net], bundle, prompt_ids, n_tokens, downlinks[dl])
            finally:
                torch.set_num_threads(threads)

        for v in variants:  # warm-up: server paths, relay threads, generate's first call
            once(*v)
        runs = {v[:2]: [] for v in variants}
        t_start = time.perf_counter()
        for r in range(rounds):
            shift = r % len(variants)
            for v in variants[shift:] + variants[:shift]:
                runs[v[:2]].append(once(*v))
            log(f"  end to end: round {r + 1}/{rounds} ({time.perf_counter() - t_start:.0f} s)")
        seconds = time.perf_counter() - t_start

    plain_runs = runs[("plain", "in-process")]
    plain_round_medians = [statistics.median(s["total_ms"] for s in g["steps"]) for g in plain_runs]
    plain_tokens = plain_runs[0]["tokens"]
    rows = []
    for name, net, dl in variants:
        gens = runs[(name, net)]
        steps = [s for g in gens for s in g["steps"]]
        row = {"variant": name, "network": net, "downlink": dl or "-", "generations": len(gens),
               "tokens_per_generation": n_tokens, "steps": len(steps),
               "per_token_ms": summarize([s["total_ms"] for s in steps]),
               "ttft_ms": summarize([g["ttft_ms"] for g in gens])}
        if name != "plain":
            for part in ("client_ms", "server_ms", "wire_ms", "rtt_ms"):
                row[part] = summarize([s[part] for s in steps])
            row["bytes_up_per_token"] = statistics.median(s["bytes_up"] for s in steps)
            row["bytes_down_per_token"] = statistics.median(s["bytes_down"] for s in steps)
            row["prefill_bytes_up"] = gens[0]["prefill"]["bytes_sent"]
            row["prefill_bytes_down"] = gens[0]["prefill"]["bytes_received"]
            prof = next((p for p in profiles if p.name == net), None)
            if prof is not None and prof.mbit:
                # the link model alone: RTT + both messages serialised at the link rate
                row["link_model_ms"] = prof.rtt_ms + (row["bytes_up_per_token"] + row["bytes_down_per_token"]) * 8 / (
                    prof.mbit * 1e3)
            row["same_tokens_as_plain"] = all(_same_tokens(p["tokens"], g["tokens"], eos)
                                              for p, g in zip(plain_runs, gens))
            round_medians = [statistics.median(s["total_ms"] for s in g["steps"]) for g in gens]
            row["ratio_to_plain"] = paired(round_medians, plain_round_medians)
            row["ratio_of_medians"] = row["per_token_ms"]["median"] / statistics.median(
                s["total_ms"] for g in plain_runs for s in g["steps"])
        rows.append(row)
    return {
        "method": f"{rounds} rounds x {n_tokens} generated tokens per variant ({n_tokens - 1} timed decode steps "
                  f"each), variants interleaved with the order rotated every round, after one warm-up generation "
                  f"each; per-token figures pool all steps; ratio_to_plain = median over rounds of "
                  f"(round median STIP step / round median plain step)",
        "prompt_tokens": len(prompt_ids),
        "settings": dict(settings),
        "server": f"stip serve (separate process, --threads {threads}), loopback; the client in the bench process "
                  f"({client_threads} torch thread(s) while it runs STIP; the plain baseline gets {threads})",
        "torch_threads": threads,
        "networks": {"loopback": {"label": "loopback (no added delay)"},
                     **{p.name: {**p.as_dict(), "measured": calibration[p.name]} for p in profiles}},
        "plain_tokens_sample": plain_tokens[:16],
        "rows": rows,
        "seconds": round(seconds, 1),
    }
