"""A cost model, not a measurement of TEE mode on a GPU: the expected per-token overhead of TEE mode for a
LLaMA-2-7B-shaped model on one H100, with the enclave on the host CPU (issue 23, step 6; docs/tee.md).

    .venv/bin/python -m bench.tee_cost_model          # measures the CPU parts here; prints the model (Markdown)

What is measured, on this machine's CPU, one torch thread (the enclave's side needs no GPU):
  - the enclave's critical path for one decode token at 7B shapes: the embedding row, block 0 as transformers runs
    it (RMSNorms, RoPE, attention over a KV cache of `context` tokens, SiLU, residual adds) with each offloaded
    linear replaced by exactly the enclave's own arithmetic around it (pad added, the mask A applied, B undone,
    `W r` subtracted, all float64, with the pads taken ready-made as from a full pool), the final norm, the untied
    LM head's unmasking over 32,000 logits, undoing `pc`, argmax;
  - the pad pool's background work: float64 matmuls of 32 rows against 7B-shaped weights, as GFLOP/s of one core,
    hence CPU core-milliseconds per token to keep the pool full.
What is assumed (labelled in the output, change them with the options): the round trip's GPU time per token, the
GPU's effective memory bandwidth for block 0's and the LM head's float64 copies, and the latency of one
enclave-worker message on one host. No figure from bench/gpu.py exists yet (no GPU run has been committed).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
             vocab_size=32000, num_hidden_layers=1, max_position_embeddings=4096)
LAYERS = 32
GROUPS = (("q/k/v", 4096, 3 * 4096), ("o", 4096, 4096), ("gate/up", 4096, 2 * 11008), ("down", 11008, 4096),
          ("lm_head", 4096, 32000))
MESSAGES = 6  # q/k/v, o, gate/up, down, the untied LM head, the body
FLOAT64_EXTRA_BYTES = 6  # float64 copies (8 bytes) of block 0's linears and the LM head instead of fp16 (2)


class EnclaveSide(nn.Module):
    """What the enclave computes around one offloaded linear: pad, mask, unmask, subtract (no worker, no matmul)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.d_out = d_out
        self.perm_in, self.perm_out = torch.randperm(d_in), torch.randperm(d_out)
        self.scale_in = torch.ones(d_in, dtype=torch.float64)
        self.scale_out = torch.ones(d_out, dtype=torch.float64)
        self.pool = (torch.randn(1, d_in, dtype=torch.float64), torch.randn(1, d_out, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).double()
        n = rows.shape[0]
        if n == 1:  # a decode step: the pool's rows copied out, as PadPool.take does
            r, wr = self.pool[0].clone(), self.pool[1].clone()
        else:  # the prompt (not timed)
            r, wr = torch.zeros_like(rows), torch.zeros(n, self.d_out, dtype=torch.float64)
        sent = (rows + r)[:, self.perm_in] * self.scale_in  # A (x + r)
        y = torch.empty(rows.shape[0], self.d_out, dtype=torch.float64)  # the worker's answer arrives here
        z = torch.empty_like(y)
        z[:, self.perm_out] = y / self.scale_out  # B^-1
        out = (z - wr).float()
        r.zero_()
        wr.zero_()
        del sent
        return out.reshape(*x.shape[:-1], self.d_out)


def enclave_ms(context: int, reps: int, preallocated: bool = False) -> float:
    """ms per decode token of the enclave's critical path at 7B shapes with `context` cached tokens; block 0's KV
    cache a transformers DynamicCache (each step copies the whole cache) or, with `preallocated`, the enclave's own
    (stip.enclave.kv_cache: each step writes its row in place in a buffer that doubles)."""
    from transformers import DynamicCache, LlamaConfig, LlamaModel

    from stip.enclave.kv_cache import new_cache

    cfg = LlamaConfig(**SHAPE)
    with torch.device("meta"):
        base = LlamaModel(cfg)
    layer = base.layers[0]
    for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                          (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
        for n in names:
            lin = getattr(parent, n)
            setattr(parent, n, EnclaveSide(lin.in_features, lin.out_features))
    base.embed_tokens = nn.Embedding(1, 1)  # the enclave looks rows up in its own table
    base = base.to_empty(device="cpu").eval()
    for m in base.modules():
        if hasattr(m, "variance_epsilon"):
            m.weight.data.fill_(1.0)
    base.rotary_emb = type(base.rotary_emb)(cfg)
    table = torch.randn(cfg.vocab_size, cfg.hidden_size)
    final_norm, head = base.norm, EnclaveSide(cfg.hidden_size, cfg.vocab_size)
    inverse = torch.argsort(torch.randperm(cfg.vocab_size))
    cache = new_cache(cfg, cfg.max_position_embeddings) if preallocated else DynamicCache(config=cfg)
    with torch.no_grad():
        pos = torch.arange(context)
        base(inputs_embeds=table[torch.randint(0, 32000, (1, context))], past_key_values=cache, use_cache=True,
             position_ids=pos[None], cache_position=pos)
        times = []
        for i in range(reps):
            t0 = time.perf_counter()
            p = torch.tensor([context + i])
            h = base(inputs_embeds=table[torch.tensor([[7]])], past_key_values=cache, use_cache=True,
                     position_ids=p[None], cache_position=p).last_hidden_state[0]
            logits = head(final_norm(h))
            int(logits.index_select(1, inverse).argmax())  # undoing `pc` as the enclave does: a gather
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def pad_gflops(reps: int = 3) -> float:
    """float64 GFLOP/s of one core on the pool's work: 32 pad rows against a 4096 x 11008 weight."""
    w = torch.randn(11008, 4096, dtype=torch.float64)
    r = torch.randn(32, 4096, dtype=torch.float64)
    r @ w.t()
    t0 = time.perf_counter()
    for _ in range(reps):
        r @ w.t()
    return 2 * 32 * 4096 * 11008 * reps / (time.perf_counter() - t0) / 1e9


def model(a, enclave: dict[tuple[int, str], float], gflops: float) -> str:
    flops = 2 * sum(i * o for _, i, o in GROUPS)  # `W r` per token: block 0's groups and the LM head
    pad_core_ms = flops / (gflops * 1e9) * 1e3
    extra_gpu_ms = (sum(i * o for _, i, o in GROUPS) * FLOAT64_EXTRA_BYTES) / (a.gpu_tbps * 1e12) * 1e3
    lines = ["# TEE mode on a GPU: a cost model (not a measurement)", "",
             "Measured here (this CPU, one torch thread): the enclave's critical path per decode token at "
             "LLaMA-2-7B shapes, pads from a full pool: " + ", ".join(f"{v:.2f} ms at {c} cached tokens ({kind})"
                                                                       for (c, kind), v in enclave.items())
             + f"; the pool's float64 matmuls at {gflops:.1f} GFLOP/s per core, so `W r` for one token "
             f"({flops / 1e9:.2f} GFLOP: block 0 and the untied LM head) costs {pad_core_ms:.1f} core-ms in the "
             "background.", "",
             f"Assumed: round trip GPU time per token T_rt (below); block 0's linears and the LM head read in float64 "
             f"at {a.gpu_tbps} TB/s effective (+{extra_gpu_ms:.2f} ms against fp16); {MESSAGES} enclave-worker "
             f"messages per token at {a.message_ms} ms each on one host.", "",
             "| T_rt (round trip, ms/token) | context, block 0's cache | enclave | messages | float64 extra | "
             "TEE ms/token | overhead |", "|---|---|---|---|---|---|---|"]
    for t_rt in a.t_rt:
        for (ctx, kind), e in enclave.items():
            extra = e + MESSAGES * a.message_ms + extra_gpu_ms
            lines.append(f"| {t_rt:g} | {ctx}, {kind} | {e:.2f} | {MESSAGES * a.message_ms:.2f} | "
                         f"{extra_gpu_ms:.2f} | {t_rt + extra:.2f} | +{100 * extra / t_rt:.1f}% |")
    lines += ["", f"Pads: at R tokens/s the pool needs R x {pad_core_ms:.1f} core-ms per second of host CPU "
              f"(one core keeps up with about {1e3 / pad_core_ms:.0f} tokens/s)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1024], help="cached tokens in block 0")
    ap.add_argument("--t-rt", type=float, nargs="+", default=[7.0, 12.0, 25.0],
                    help="assumed round-trip ms per token on the GPU")
    ap.add_argument("--gpu-tbps", type=float, default=2.5, help="assumed effective GPU memory bandwidth, TB/s")
    ap.add_argument("--message-ms", type=float, default=0.15, help="assumed enclave-worker message latency, ms")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    enclave = {(c, kind): enclave_ms(c, a.reps, kind == "preallocated") for c in a.contexts
               for kind in ("dynamic", "preallocated")}
    print(model(a, enclave, pad_gflops()))


if __name__ == "__main__":
    main()
