"""End to end: plain transformers `generate` against STIP (a real `stip serve` process and the shipped `stip.Client`).

Variants, interleaved round by round (the order rotates each round):

* plain: `model.generate` in this process, greedy, the unprotected model fed token ids; a streamer's timestamps give
  the first token and the end.
* stip-logits / stip-topk: `stip.Client.generate` itself (the SDK users call), with the full logits downlink (V
  float32) or the top-k downlink (k (index, value) pairs); over loopback, and over each simulated network of
  `bench.netsim` (a relay process between client and server).

Per generation, per token = (total - time to the first token) / decode steps, for both. For STIP the client's own
`Timing` splits a decode step into
  server = `server_ms` the server reports (payload -> tensor, forward, top-k, reply bytes; its server runs with
           `--expose-timing`, since servers keep that time to themselves by default),
  wire   = round trip - server (network, WebSocket framing, the server's event loop),
  client = embedding, un-permuting, sampling, detokenizing.
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

    with local_server(server_dir, "--threads", str(threads), "--expose-timing", timeout=timeout) as server:
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
    ttft = (stamps.t[1] - t0) * 1e3  # t[0]: the prompt was put; t[1]: the first generated token
    return {"ttft_ms": ttft, "total_ms": total * 1e3, "steps": n_tokens - 1,
            "per_token_ms": (total * 1e3 - ttft) / (n_tokens - 1) if n_tokens > 1 else float("nan"),
            "tokens": out[0, len(prompt_ids):].tolist()}


def stip_generation(client, prompt_ids: list[int], n_tokens: int) -> dict:
    """One `stip.Client.generate` (greedy), summarised from its own `Timing`."""
    g = client.generate(ids=prompt_ids, max_tokens=n_tokens)
    t = g.timing
    return {"ttft_ms": t.prefill_ms, "total_ms": t.total_ms, "steps": t.steps,
            "per_token_ms": (t.total_ms - t.prefill_ms) / t.steps if t.steps else float("nan"),
            "client_ms": t.client_ms_per_token, "server_ms": t.server_ms_per_token, "wire_ms": t.wire_ms_per_token,
            "bytes_up": t.bytes_sent_per_token, "bytes_down": t.bytes_received_per_token,
            "prefill_bytes_up": t.bytes_sent - t.decode_bytes_sent,
            "prefill_bytes_down": t.bytes_received - t.decode_bytes_received, "tokens": g.token_ids}


# ------------------------------------------------------------------------------------------------ the benchmark


def same_tokens(ref: list[int], got: list[int], eos: set[int]) -> bool:
    """Greedy outputs agree before the first EOS STIP picks (the plain run masks EOS until its last token)."""
    n = next((i for i, t in enumerate(got) if t in eos), len(got))
    return ref[:n] == got[:n]


def _calibrate(profiles: list, log) -> dict:
    """{network: what its relay delivered}: a 64-byte round trip and a bulk transfer per simulated link."""
    from bench import netsim

    calibration = {}
    for p in profiles:
        calibration[p.name] = netsim.calibrate(p)
        log(f"  netsim {p.name}: configured {p.rtt_ms} ms RTT, {p.mbit} Mbit/s; measured {calibration[p.name]}")
    return calibration


def _measure(plain_model, bundle, server_dir: Path, prompt_ids: list[int], settings: dict, profiles: list,
             threads: int, log) -> tuple[list, dict, float]:
    """One `stip serve`, a relay per network, two clients (logits, top-k) per route; a warm-up generation of each
    variant, then `rounds` rounds, the order rotated. (variants, {variant: its generations}, seconds)."""
    import stip
    from bench import netsim

    n_tokens, rounds, k = settings["tokens"], settings["rounds"], settings["topk"]
    client_threads = settings.get("client_threads", 1)
    with contextlib.ExitStack() as stack:
        url, port = stack.enter_context(stip_server(server_dir, threads))
        urls = {"loopback": url}
        for p in profiles:
            relay_port = stack.enter_context(netsim.relay_process(port, p))
            urls[p.name] = f"http://127.0.0.1:{relay_port}"
        clients = {(f"stip-{d}", net): stip.Client(bundle, u, downlink=d, k=k)
                   for net, u in urls.items() for d in ("logits", "topk")}
        variants = [("plain", "in-process")] + list(clients)

        def once(name, net):
            if name == "plain":
                return plain_generation(plain_model, prompt_ids, n_tokens)
            # The client's work per token is a gather and a k- or V-sized pick: one thread, so that its idle
            # thread pool never competes with the server's threads for this machine's cores.
            torch.set_num_threads(client_threads)
            try:
                return stip_generation(clients[(name, net)], prompt_ids, n_tokens)
            finally:
                torch.set_num_threads(threads)

        for v in variants:  # warm-up: server paths, relay threads, generate's first call
            once(*v)
        runs = {v: [] for v in variants}
        t_start = time.perf_counter()
        for r in range(rounds):
            shift = r % len(variants)
            for v in variants[shift:] + variants[:shift]:
                runs[v].append(once(*v))
            log(f"  end to end: round {r + 1}/{rounds} ({time.perf_counter() - t_start:.0f} s)")
        seconds = time.perf_counter() - t_start
    return variants, runs, seconds


def _row(name: str, net: str, gens: list[dict], plain_runs: list[dict], n_tokens: int, profiles: list,
         eos: set[int]) -> dict:
    """One variant on one network: per-token time and first token; for STIP also its split, bytes, the link
    model's share, whether its tokens equal plain's and its per-round ratio to plain."""
    from bench.report import paired, summarize

    dl = name.split("-", 1)[1] if name != "plain" else "-"
    row = {"variant": name, "network": net, "downlink": dl, "generations": len(gens),
           "tokens_per_generation": n_tokens, "steps": sum(g["steps"] for g in gens),
           "per_token_ms": summarize([g["per_token_ms"] for g in gens]),
           "ttft_ms": summarize([g["ttft_ms"] for g in gens])}
    if name != "plain":
        for part in ("client_ms", "server_ms", "wire_ms"):
            row[part] = summarize([g[part] for g in gens])
        for part in ("bytes_up", "bytes_down"):
            row[f"{part}_per_token"] = statistics.median(g[part] for g in gens)
        row["prefill_bytes_up"] = gens[0]["prefill_bytes_up"]
        row["prefill_bytes_down"] = gens[0]["prefill_bytes_down"]
        prof = next((p for p in profiles if p.name == net), None)
        if prof is not None and prof.mbit:
            # the link model alone: RTT + both messages serialised at the link rate
            row["link_model_ms"] = prof.rtt_ms + (row["bytes_up_per_token"] + row["bytes_down_per_token"]) * 8 / (
                prof.mbit * 1e3)
        row["same_tokens_as_plain"] = all(same_tokens(p["tokens"], g["tokens"], eos)
                                          for p, g in zip(plain_runs, gens))
        row["ratio_to_plain"] = paired([g["per_token_ms"] for g in gens], [g["per_token_ms"] for g in plain_runs])
    return row


def run(plain_model, bundle, server_dir: Path, prompt_ids: list[int], settings: dict, profiles: list,
        log=print) -> dict:
    """Plain vs STIP over loopback and over each `profiles` network; returns a JSON-serialisable dict."""
    n_tokens, rounds = settings["tokens"], settings["rounds"]
    threads = torch.get_num_threads()
    client_threads = settings.get("client_threads", 1)
    eos = set(bundle.eos_token_ids)
    calibration = _calibrate(profiles, log)
    variants, runs, seconds = _measure(plain_model, bundle, server_dir, prompt_ids, settings, profiles, threads, log)
    plain_runs = runs[("plain", "in-process")]
    rows = [_row(name, net, runs[(name, net)], plain_runs, n_tokens, profiles, eos) for name, net in variants]
    return {
        "method": f"{rounds} rounds x {n_tokens} generated tokens per variant, variants interleaved with the order "
                  f"rotated every round, after one warm-up generation each; STIP is `stip.Client.generate` as "
                  f"shipped, its splits from the client's `Timing`; per token = (total - first token) / decode "
                  f"steps of one generation; figures are medians over generations; ratio_to_plain = median over "
                  f"rounds of (STIP per token / plain per token)",
        "prompt_tokens": len(prompt_ids),
        "settings": dict(settings),
        "server": f"stip serve (separate process, --threads {threads}), loopback; `stip.Client` in the bench process "
                  f"({client_threads} torch thread(s) while it runs; the plain baseline gets {threads})",
        "torch_threads": threads,
        "networks": {"loopback": {"label": "loopback (no added delay)"},
                     **{p.name: {**p.as_dict(), "measured": calibration[p.name]} for p in profiles}},
        "plain_tokens_sample": plain_runs[0]["tokens"][:16],
        "rows": rows,
        "seconds": round(seconds, 1),
    }
