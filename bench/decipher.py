"""How much of production-volume traffic a STIP server can decipher, and the rekey budget that follows.

    python -m bench.decipher                                  # SmolLM2, modes paper and noise=0.01, up to 1M tokens
    python -m bench.decipher --modes paper --sizes 1000,10000 --out /tmp/decipher
    python -m bench.decipher --model tests/tiny --corpus small --sizes 500,2000 --out /tmp/d   # smoke run

In a deterministic mode a token always sends the same row, so the server sees a substitution cipher whose
ciphertext grows with every token served under one key (the paper's production served over 100M tokens on ten
keys). `stip audit` measures this on a few hundred tokens; here the server's view of up to a million tokens is
computed offline (`bench.decipher_codes`: the real key, the client's own embedding step, codes from rows as a
server makes them), and `stip.audit.decipher` (a bigram-language-model decipherer with the attacker's public
statistics) attacks growing prefixes of it. Per mode and traffic size: the share of all tokens recovered and of
rare ones (outside the public text's 1,000 most frequent tokens), and the frequency-rank baseline. The rekey
budget is the traffic at which recovery first passes 5%, interpolated.

Users' text and the attacker's text are disjoint (`stip.audit.corpus_large`: Python's own docs and docstrings of
the standard library and installed packages; `--corpus small`: the `pydoc_data` split of `stip.audit.corpus`).
Writes OUT/results.{md,json} and OUT/recovery.png (default bench/results/decipher).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path("bench/results/decipher")
MODES = "paper,noise=0.01"
SIZES = "100,200,500,1000,2000,5000,10000,20000,50000,100000,300000,1000000"
CHECK = 20000  # a mode whose codes partition the traffic as an earlier mode's is recomputed up to here only
WINDOWS, WINDOWED = 3, 10000  # small sizes: the mean over this many disjoint stretches of the users' text
# the files whose state the results depend on (the tree may hold other people's uncommitted work)
SOURCES = ["bench/decipher.py", "bench/decipher_codes.py", "bench/decipher_report.py", "stip/audit/decipher.py",
           "stip/audit/linking.py", "stip/audit/corpus_large.py", "stip/audit/corpus.py", "stip/client/bundle.py",
           "stip/client/noise.py"]


def log(msg: str) -> None:
    print(f"[decipher] {msg}", flush=True)


def protect(model: str, out: Path, mode: str) -> None:
    """`stip protect MODEL --out OUT` in `mode`: "paper", or `+`-joined `--harden` options and `noise=SIGMA`."""
    import stip
    from stip.models import resolve_model

    parts = [p for p in mode.split("+") if p and p != "paper"]
    noise = [float(p.split("=", 1)[1]) for p in parts if p.startswith("noise=")]
    harden = tuple(p for p in parts if not p.startswith("noise="))
    kw = {"harden": harden} if harden else {}
    stip.protect(resolve_model(model), out, progress=False, **kw, **({"noise": noise[-1]} if noise else {}))


def load_corpus(tokenizer, name: str, users_tokens: int) -> dict:
    """{"users": ids, "attacker": ids, "name", "sources"}: the two disjoint token streams."""
    if name == "large":
        from stip.audit import corpus_large

        return {"users": corpus_large.token_stream(tokenizer, "users", users_tokens),
                "attacker": corpus_large.token_stream(tokenizer, "attacker"), "sources": corpus_large.sources(),
                "name": "stip.audit.corpus_large: pydoc_data, and docstrings of the standard library and "
                        + ", ".join(corpus_large.PACKAGES)}
    import platform

    from stip.audit.corpus import token_ids

    return {"users": token_ids(tokenizer, "prompts", users_tokens).numpy(),
            "attacker": token_ids(tokenizer, "public").numpy(), "sources": {"python": platform.python_version()},
            "name": "stip.audit.corpus: the pydoc_data topics (prompts / public parts)"}


def window(streams: list[np.ndarray], start: int, n: int) -> list[np.ndarray]:
    """Tokens start..start+n of a list of requests, as requests (the first and last ones cut)."""
    out, pos = [], 0
    for s in streams:
        lo, hi = max(start - pos, 0), min(start + n - pos, len(s))
        if lo < hi:
            out.append(s[lo:hi])
        pos += len(s)
        if pos >= start + n:
            break
    return out


def partition(codes: list[np.ndarray]) -> np.ndarray:
    """The codes relabelled by first appearance: two code streams with equal partitions give equal arrays (the
    decipherer sees nothing else, so it deciphers them alike)."""
    flat = np.concatenate(codes)
    _, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse]


def _load_once(state: dict, bundle, corpus_name: str, max_size: int) -> None:
    """The corpus and the attacker's statistics, made with the first mode's tokenizer (every mode shares it)."""
    if "corpus" in state:
        return
    from stip.audit.decipher import LanguageStats
    from stip.audit.run import CharTokenizer

    tok = bundle.tokenizer if bundle.has_tokenizer else CharTokenizer(bundle.vocab_size)
    t0 = time.perf_counter()
    state["corpus"] = load_corpus(tok, corpus_name, max_size)
    state["stats"] = LanguageStats(state["corpus"]["attacker"])
    state["common"] = state["stats"].top(1000)
    log(f"corpus: {len(state['corpus']['users']):,} users' tokens, {len(state['corpus']['attacker']):,} "
        f"attacker's ({time.perf_counter() - t0:.0f} s)")


def decipher_window(codes, requests, start: int, n: int, stats, common) -> dict:
    """The decipherer and the frequency-rank baseline on tokens start..start+n."""
    from stip.audit.decipher import decipher, rank_map, recovery

    streams, truth = window(codes, start, n), window(requests, start, n)
    t1 = time.perf_counter()
    mapping = decipher(streams, stats)
    score = recovery(mapping, streams, truth, common)
    seconds = time.perf_counter() - t1
    base = recovery(rank_map(streams, stats), streams, truth, common)
    return {"codes": len(mapping), **score, "rank_only": base["all"], "rank_only_rare": base["rare"],
            "coverage": stats.coverage(np.concatenate(truth)), "seconds": seconds}


def measure(mode: str, codes, requests, sizes: list[int], state: dict, same: dict | None, check: int) -> list[dict]:
    """One point per traffic size: the decipherer's recovery and the frequency-rank baseline, averaged over up to
    WINDOWS disjoint stretches of the users' text for sizes up to WINDOWED (small traffic depends on which text it
    is), else on the first n tokens. With `same` (the points of an earlier mode whose code stream has this one's
    partition), sizes above `check` are taken from it and the others recomputed, as a check."""
    rows = int(sum(len(r) for r in requests))
    points = []
    for n in sizes:
        if n > rows:
            log(f"mode {mode}: {n:,} tokens skipped: the users' text has {rows:,}")
            continue
        if same is not None and n > check and n in same:
            points.append({**same[n], "copied_from": same[n].get("copied_from") or state["first_mode"]})
            continue
        count = min(WINDOWS, rows // n) if n <= WINDOWED else 1
        runs = [decipher_window(codes, requests, j * n, n, state["stats"], state["common"]) for j in range(count)]
        point = {"tokens": n, "windows": count}
        for key in runs[0]:
            values = [r[key] for r in runs if r[key] is not None]
            point[key] = float(np.mean(values)) if values else None
        point["seconds"] = float(sum(r["seconds"] for r in runs))
        point["per_window"] = {"all": [r["all"] for r in runs], "rare": [r["rare"] for r in runs]}
        points.append(point)
        log(f"mode {mode}: {n:,} tokens ({count} window{'s' if count > 1 else ''}): all {point['all']:.3f}, rare {point['rare'] or 0:.3f} "
            f"(rank only {point['rank_only']:.3f}) in {point['seconds']:.1f} s")
    return points


def run_mode(model: str, mode: str, tmp: Path, corpus_name: str, sizes: list[int], request_tokens: int,
             state: dict, check: int) -> dict:
    """Protect `model` in `mode`, compute its code stream for the users' text and decipher growing prefixes.
    `state` carries the corpus, the statistics and earlier modes' partitions from one mode to the next."""
    from bench.decipher_codes import code_stream, purity, requests_of
    from bench.decipher_report import budget
    from stip.client.bundle import ClientBundle

    bundle_dir = tmp / "".join(c if c.isalnum() or c in "=.+_-" else "-" for c in mode)
    log(f"mode {mode}: protecting {model}")
    protect(model, bundle_dir, mode)
    bundle = ClientBundle.load(bundle_dir / "client")
    _load_once(state, bundle, corpus_name, max(sizes))
    requests = requests_of(state["corpus"]["users"][:max(sizes)], request_tokens)
    t0 = time.perf_counter()
    codes, details = code_stream(bundle, requests, progress=lambda m: log(f"mode {mode}: {m}"))
    codes_s = time.perf_counter() - t0
    linking = {**purity(codes, requests), "rows": int(sum(len(r) for r in requests))}
    log(f"mode {mode}: {linking['codes']:,} codes for {linking['tokens']:,} tokens, purity {linking['purity']:.4f} "
        f"({codes_s:.0f} s)")
    part = partition(codes)
    same_as = next((m for m, p in state.setdefault("partitions", {}).items() if np.array_equal(p, part)), None)
    state["partitions"][mode] = part
    state.setdefault("first_mode", mode)
    same = {p["tokens"]: p for p in state["points"][same_as]} if same_as else None
    points = measure(mode, codes, requests, sizes, state, same, check)
    state.setdefault("points", {})[mode] = points
    rechecked = [p for p in points if same and "copied_from" not in p and p["tokens"] in same]
    check_equal = all(p["all"] == same[p["tokens"]]["all"] and p["rare"] == same[p["tokens"]]["rare"]
                      for p in rechecked) if same else None
    return {"mode": mode, "codes_from": details["codes_from"], "linking": linking, "codes_seconds": codes_s,
            "same_partition_as": same_as, "check_equal": check_equal, "points": points,
            "budget": {m: budget(points, m) for m in ("all", "rare")}}


def run(model: str, modes: list[str], sizes: list[int], out: Path, corpus_name: str, request_tokens: int,
        command: str, check: int = CHECK) -> dict:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every tensor here is small: on a shared 2-core machine the pool costs 2-10x
    try:
        return _run(model, modes, sizes, out, corpus_name, request_tokens, command, check)
    finally:
        torch.set_num_threads(threads)


def _run(model: str, modes: list[str], sizes: list[int], out: Path, corpus_name: str, request_tokens: int,
         command: str, check: int) -> dict:
    from bench.report import git, machine_info

    t0, load = time.perf_counter(), os.getloadavg()[0]
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--", *SOURCES)
    state: dict = {}
    with tempfile.TemporaryDirectory(prefix="stip-decipher-") as tmp:
        results = [run_mode(model, mode, Path(tmp), corpus_name, sizes, request_tokens, state, check)
                   for mode in modes]
    corpus = state.get("corpus", {})
    res = {"model": str(model), "command": command, "commit": commit, "dirty": bool(dirty),
           "dirty_files": (dirty or "").splitlines(), "machine": machine_info(), "request_tokens": request_tokens,
           "sizes": sizes, "threshold": 0.05, "check": check, "windows": {"count": WINDOWS, "up_to": WINDOWED},
           "corpus": {"name": corpus.get("name"), "sources": corpus.get("sources", {}),
                      "users_tokens": int(len(corpus.get("users", []))),
                      "attacker_tokens": int(len(corpus.get("attacker", [])))},
           "modes": results, "seconds": time.perf_counter() - t0,
           "load_average": {"start": load, "end": os.getloadavg()[0]}}
    write(res, out)
    return res


def write(res: dict, out: Path) -> None:
    from bench.decipher_report import markdown, plot
    from stip.common.files import write_bytes_atomic

    out.mkdir(parents=True, exist_ok=True)
    res["plot"] = plot(res, out / "recovery.png")
    write_bytes_atomic(out / "results.json", (json.dumps(res, indent=2, default=str) + "\n").encode())
    write_bytes_atomic(out / "results.md", markdown(res).encode())


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m bench.decipher", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (default) or a Hugging Face model folder")
    ap.add_argument("--modes", default=MODES, help="comma-separated modes: paper, or +-joined --harden options and "
                                                   f"noise=SIGMA (default {MODES})")
    ap.add_argument("--sizes", default=SIZES, help="comma-separated traffic sizes in tokens")
    ap.add_argument("--corpus", choices=("large", "small"), default="large",
                    help="large: stip.audit.corpus_large (default); small: the pydoc_data split (smoke runs)")
    ap.add_argument("--request-tokens", type=int, default=512, help="tokens per request (default 512)")
    ap.add_argument("--check", type=int, default=CHECK,
                    help="a mode whose code stream has an earlier mode's partition (e.g. noise linked exactly) is "
                         f"deciphered up to this size, the rest taken from that mode (default {CHECK:,})")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    sizes = sorted({int(s) for s in a.sizes.split(",") if s.strip()})
    res = run(a.model, modes, sizes, a.out, a.corpus, a.request_tokens,
              shlex.join(["python", "-m", "bench.decipher", *argv]), a.check)
    from bench.decipher_report import fmt_budget, markdown

    print(markdown(res))
    for mode in res["modes"]:
        if "budget" in mode:
            print(f"rekey budget ({mode['mode']}): all tokens {fmt_budget(mode['budget']['all'])}; "
                  f"rare tokens {fmt_budget(mode['budget']['rare'])}")
    return res


if __name__ == "__main__":
    main()
