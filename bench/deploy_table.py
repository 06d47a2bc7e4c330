"""Issue 22's budgets for a 7B-shaped table, measured: a synthetic client bundle whose embedding table is 32000 x 4096
float16 (LLaMA2-7B's shape), run through the light client's own per-token code on one core.

    python -m bench.deploy_table write DIR --tokenizer-from CLIENT_BUNDLE [--rows 32000 --cols 4096]
    python -m bench.deploy_table run DIR [--touch 1000]        # prints one JSON object (the light venv runs it)

`write` makes DIR/client, a client bundle as `stip protect` lays one out: the table in embedding-token.safetensors
(safetensors, one tensor "weight", F16: what protect writes for a float16 checkpoint), a client key file (random `p`
and `pc`, in the key-file format `stip.common.key_file` checks), stip_client.json, and a manifest signed by a fresh
developer key (DIR/signer.json names it: `run` pins it). Only the tokenizer is borrowed: another bundle's (SmolLM2's,
49152 entries, where LLaMA2's has 32000), since no 7B tokenizer is on this machine; token ids stay below the
table's rows. The table is random (normal, std 0.02); nothing here depends on its values.

`run` loads the bundle with `ClientBundle.load` (the manifest's sha256 over every file included: the table is read row
by row by `stip.client.tables.RowFile`, as for a real bundle), then embeds a prompt and takes `--touch` decode steps,
each on a distinct token, through what the client does between two round trips on the top-k downlink: the server's reply
frame decoded and checked (`wire.decode_frame`, `replies.check_reply`, 64 pairs), the token picked through the key
(`sdk.pick_token`: `plain_ids`, `Sampler.from_topk`), observed, detokenized (`Detokenizer`, `StopMatcher`), its row
gathered and permuted (`ClientBundle.embed`) and the next request framed (`wire.encode_frame`). The replies are
made before each step's clock starts (the server's work). Resident memory (/proc/self/status) is read after the
imports, after the bundle is loaded, after its tokenizer is, and after the steps; the budget is the tokenizer's
share + the touched rows' bytes + 50 MB (MB here are MiB, as /proc counts them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench.deploy_probe import memory  # the same /proc/self/status reading (stdlib only: runs in the light venv)

SHAPE_7B = (32000, 4096)
K = 64
SLACK_MB = 50.0  # the "+ 50 MB"
BUDGET_MS = 1.0  # the client compute per token for this shape
PROMPT = "Explain how photosynthesis works, step by step, for a school class."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


# ------------------------------------------------------------------------------------------------ writing


def _table(rows: int, cols: int, seed: int):
    """A random [rows, cols] float16 table (std 0.02), filled in chunks so that no float32 copy of it is made."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = np.empty((rows, cols), dtype=np.float16)
    step = max(1, (1 << 22) // cols)
    for a in range(0, rows, step):
        part = rng.standard_normal((min(step, rows - a), cols), dtype=np.float32)
        out[a:a + part.shape[0]] = part * np.float32(0.02)
    return out


def write(where: Path, tokenizer_from: Path, rows: int = SHAPE_7B[0], cols: int = SHAPE_7B[1], seed: int = 0) -> dict:
    """DIR/client (a signed client bundle with a rows x cols float16 table) and DIR/signer.json; what was written."""
    import uuid

    import numpy as np
    from safetensors.numpy import save_file

    from stip.common.bundles.manifest import write_manifest
    from stip.common.key_file import KEY_FORMAT, KEY_VERSION, fingerprint
    from stip.common.layout import CLIENT_CONFIG_FILE, CLIENT_KEY_FILE, EMBEDDING_FILE
    from stip.common.signing import generate_signing_key, signer_info

    client, tokenizer_from = Path(where) / "client", Path(tokenizer_from)
    client.mkdir(parents=True)
    t0 = time.perf_counter()
    save_file({"weight": _table(rows, cols, seed)}, str(client / EMBEDDING_FILE.format("token")))
    table_s = time.perf_counter() - t0
    bundle_id = uuid.uuid4().hex
    rng = np.random.default_rng(seed + 1)
    key = {"resid.perm": rng.permutation(cols).astype(np.int64), "vocab.perm": rng.permutation(rows).astype(np.int64)}
    fp = fingerprint("client", bundle_id, key)
    save_file(key, str(client / CLIENT_KEY_FILE), metadata={"format": KEY_FORMAT, "version": str(KEY_VERSION),
                                                          "kind": "client", "bundle_id": bundle_id, "fingerprint": fp})
    (client / CLIENT_KEY_FILE).chmod(0o600)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            (client / name).write_bytes((tokenizer_from / name).read_bytes())
    config = {"bundle_id": bundle_id, "embedding_scale": 1.0, "eos_token_ids": [2], "harden": [], "hidden_size": cols,
              "learned_positions": False, "max_positions": 4096, "mode": "round-trip", "model_type": "llama",
              "noise": 0.0, "task": "text-generation", "vocab_size": rows, "synthetic": "bench.deploy_table"}
    (client / CLIENT_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    signer = generate_signing_key()
    write_manifest(client, "client", bundle_id, {"client_key_fingerprint": fp, "mode": "round-trip", "harden": [],
                                                 "noise": 0.0, "model_type": "llama"}, signing_key=signer)
    info = {"rows": rows, "cols": cols, "dtype": "F16", "seed": seed, "table_bytes": rows * cols * 2,
            "tokenizer_from": str(tokenizer_from), "signer": signer_info(signer)["fingerprint"],
            "write_seconds": round(table_s, 1)}
    (Path(where) / "signer.json").write_text(json.dumps(info, indent=2))
    return info


# ------------------------------------------------------------------------------------------------ running



def _reply(bundle, rng, token: int, position: int) -> bytes:
    """The frame a server sends for one top-k step whose best candidate is `token` (k distinct permuted ids, values
    descending, the row's logsumexp): as `stip.server.step_request.reply_parts` and the service build it."""
    import numpy as np

    from stip.common import wire

    first = int(bundle.key.vocab.inverse_perm[token])
    others = rng.choice(bundle.vocab_size - 1, K - 1, replace=False)
    others = others + (others >= first)  # skip `first`
    idx = np.concatenate([[first], others]).astype(np.int32).reshape(1, K)
    values = (np.sort(rng.standard_normal(K).astype(np.float32))[::-1] + np.float32(10)).reshape(1, K)
    values[0, 0] += np.float32(1)  # a clear best, so greedy picks `token`
    lse = np.array([values[0, 0] + 0.5], dtype=np.float32)
    header = {"ok": True, "kind": "topk", "shape": [1, K], "dtype": "float32", "position": position}
    return wire.encode_frame(header, wire.tensor_bytes(idx), wire.tensor_bytes(values), wire.tensor_bytes(lse))


def _steps(bundle, prompt: list[int], targets: list[int]) -> tuple[list[dict], list[int]]:
    """The decode steps, one per target token: per step the ms of each part of the client's work; the tokens."""
    import numpy as np

    from stip.client.replies import Expected, check_reply
    from stip.client.sdk import pick_token
    from stip.client.session import Downlink, StepResult
    from stip.client.token_stream import Detokenizer, StopMatcher
    from stip.common import wire
    from stip.common.sampling import Sampler, SamplingParams

    rng = np.random.default_rng(1)
    sampler, detok, stops = Sampler(SamplingParams(max_tokens=len(targets)), prompt), \
        Detokenizer(bundle.tokenizer, prompt), StopMatcher([])
    noise, down, url = bundle.noise_chain(), Downlink("topk", K).header(), "bench://synthetic"
    parts, tokens, pos = [], [], len(prompt)
    for target in targets:
        frame = _reply(bundle, rng, target, pos)
        t0 = time.perf_counter()
        header, payload = wire.decode_frame(frame)
        out = check_reply(url, bundle.vocab_size, header, payload, Expected("topk", 1, K, pos))
        t1 = time.perf_counter()
        token = pick_token(bundle, sampler, StepResult(None, out[1], out[2], pos, None, 0.0, 0, 0, out[3]))
        sampler.observe(token)
        t2 = time.perf_counter()
        stops.push(detok.push(token))
        t3 = time.perf_counter()
        x = bundle.embed(np.array([token], dtype=np.int64), start=pos, noise=noise)
        t4 = time.perf_counter()
        wire.encode_frame(wire.request_header("decode", (1, x.shape[-1]), "float32", None, down),
                          wire.array_bytes(x.reshape(1, -1), "float32"))
        t5 = time.perf_counter()
        parts.append({"reply": t1 - t0, "pick": t2 - t1, "detokenize": t3 - t2, "embed": t4 - t3,
                      "request": t5 - t4, "total": t5 - t0})
        tokens.append(token)
        pos += 1
    return parts, tokens


def _summary(parts: list[dict]) -> dict:
    """Median ms of each part, and the total's p90 and max."""
    ms = {key: [p[key] * 1e3 for p in parts] for key in parts[0]}
    out = {f"{key}_ms": round(statistics.median(v), 4) for key, v in ms.items()}
    total = sorted(ms["total"])
    out["total_p90_ms"], out["total_max_ms"] = round(total[int(0.9 * len(total))], 4), round(total[-1], 4)
    return out


def run(where: Path, touch: int) -> dict:
    """Load the synthetic bundle, embed the prompt, take `touch` decode steps on distinct rows; times and memory."""
    start = memory()
    import numpy as np

    from bench.deploy_probe import limits

    import stip  # noqa: F401 - what a client process imports
    from stip.client.bundle import ClientBundle
    from stip.client.sdk import Client  # noqa: F401

    info = json.loads((Path(where) / "signer.json").read_text())
    mem = {"start": start, "imported": memory()}
    t0 = time.perf_counter()
    bundle = ClientBundle.load(Path(where) / "client", trusted=info["signer"])
    load_ms = (time.perf_counter() - t0) * 1e3
    mem["bundle"] = memory()
    t0 = time.perf_counter()
    prompt = bundle.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                                return_dict=False)
    tokenizer_ms = (time.perf_counter() - t0) * 1e3
    mem["tokenizer"] = memory()
    rows = bundle.vocab_size
    folded = sum(1 for t in prompt if t >= rows)
    prompt = [t % rows for t in prompt]  # the borrowed tokenizer's ids past the table, folded into it
    if touch + len(set(prompt)) > rows:
        raise SystemExit(f"error: the prompt's ids and {touch} more do not fit a table of {rows} rows")
    bundle.embed(np.array(prompt, dtype=np.int64))  # the prefill's rows
    mem["prompt"] = memory()
    pool = np.setdiff1d(np.arange(rows), np.array(prompt) if prompt else [])
    targets = [int(t) for t in np.random.default_rng(2).choice(pool, touch, replace=False)]
    parts, tokens = _steps(bundle, prompt, targets)
    mem["after"] = memory()
    if tokens != targets:
        raise SystemExit("error: the client did not pick the tokens the replies made best")
    touched = len(set(prompt) | set(tokens))
    row_mb = bundle.hidden_size * 2 / 2**20
    tokenizer_mb = mem["tokenizer"]["VmRSS"] - mem["bundle"]["VmRSS"]
    budget = tokenizer_mb + touched * row_mb + SLACK_MB
    return {"rows": rows, "cols": bundle.hidden_size, "touch": touch, "touched_rows": touched,
            "touched_rows_mb": round(touched * row_mb, 2), "prompt_tokens": len(prompt), "prompt_ids_folded": folded,
            "k": K,
            "bundle_load_ms": round(load_ms, 1), "tokenizer_load_ms": round(tokenizer_ms, 1),
            "per_token": _summary(parts), "memory": mem, "tokenizer_mb": round(tokenizer_mb, 1),
            "rss_mb": mem["after"]["VmRSS"], "rss_peak_mb": mem["after"]["VmHWM"],
            "rss_budget_mb": round(budget, 1), "rss_growth_file_mb": round(
                mem["after"]["RssFile"] - mem["tokenizer"]["RssFile"], 1),
            "limits": limits(), "torch_imported": "torch" in sys.modules, "python": sys.executable}


def measure(python: Path, tokenizer_from: Path, shape: tuple[int, int], touch: int, cores: str = "0",
            address_space_gb: float = 4.0, log=print) -> dict:
    """`python -m bench.deploy`'s part: write the synthetic bundle in a temporary folder, then `run` it with `python`
    (the light venv's) under `taskset -c cores` and an address-space limit (the laptop profile: one core, 4 GB)."""
    import os
    import resource
    import subprocess
    import tempfile

    limit = int(address_space_gb * 2**30)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="stip-deploy-table-") as tmp:
        info = write(Path(tmp), tokenizer_from, *shape)
        log(f"[deploy] synthetic {shape[0]} x {shape[1]} float16 client bundle written in {info['write_seconds']} s")
        cmd = ["taskset", "-c", cores, str(python), "-m", "bench.deploy_table", "run", tmp, "--touch", str(touch)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo, timeout=900,
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    got.update(written=info, profile=f"taskset -c {cores}, address space {address_space_gb:g} GB",
               seven_b=tuple(shape) == SHAPE_7B, budget_ms=BUDGET_MS, slack_mb=SLACK_MB)
    log(f"[deploy] table {shape[0]} x {shape[1]}: {got['per_token']['total_ms']:.3f} ms/token, RSS "
        f"{got['rss_mb']} MB (budget {got['rss_budget_mb']})")
    return got


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.deploy_table", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    w = sub.add_parser("write", help="write DIR/client, a synthetic client bundle")
    w.add_argument("dir", type=Path)
    w.add_argument("--tokenizer-from", type=Path, required=True, help="a client bundle whose tokenizer to copy")
    w.add_argument("--rows", type=int, default=SHAPE_7B[0])
    w.add_argument("--cols", type=int, default=SHAPE_7B[1])
    r = sub.add_parser("run", help="time the client's per-token work on it; print JSON")
    r.add_argument("dir", type=Path)
    r.add_argument("--touch", type=int, default=1000, help="decode steps, each on a row not touched before")
    a = ap.parse_args(argv)
    out = write(a.dir, a.tokenizer_from, a.rows, a.cols) if a.what == "write" else run(a.dir, a.touch)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
