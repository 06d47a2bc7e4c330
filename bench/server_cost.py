"""Server-side cost: the protected model against the plain model on the same engine (transformers, in-process, fp32).

The plain model is fed token ids (its own embedding lookup runs inside its forward); the protected model is fed
`inputs_embeds`, because in STIP the embedding lookup (and the secret permutation of the embeddings) happens on the
client: the embeddings are computed before the timer starts, as the server receives them ready-made. Everything
else is the same: one `DynamicCache` per batch, `logits_to_keep=1` (the server returns the last position's logits),
the same token ids, the same threads.

* prefill: B sequences of T tokens in one forward; tokens/s = B * T / seconds.
* decode: after an untimed prefill of `context` tokens, `steps` forwards of one token per sequence with the KV cache;
  tokens/s = B * steps / seconds (the sum of the timed forwards).

Variants are interleaved so that a drift in machine speed hits both alike: prefill forwards alternate plain/protected
with the order flipped every repeat (ABBA); decode runs both KV caches side by side and alternates every step (ABBA
per step). Each repeat gives one paired ratio protected/plain, and the figure is the median of those ratios (with
its IQR and range). Target: >= 0.98.
"""

from __future__ import annotations

import statistics
import time

import torch


def _cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _forward(model, inp: torch.Tensor, is_embeds: bool, cache) -> torch.Tensor:
    kw = {"inputs_embeds": inp} if is_embeds else {"input_ids": inp}
    return model(**kw, past_key_values=cache, use_cache=True, logits_to_keep=1).logits


def time_prefill(model, inp, is_embeds: bool) -> float:
    with torch.inference_mode():
        cache = _cache(model)
        t0 = time.perf_counter()
        _forward(model, inp, is_embeds, cache)
        return time.perf_counter() - t0


def time_decode_pair(models: dict, inputs: dict, first: str) -> dict:
    """Decode both variants side by side, step by step (each step ABBA-ordered), after an untimed prefill of the
    context: {variant: seconds summed over the timed steps}. Interleaving per step keeps the pair within
    milliseconds of each other, so a slow spell on the machine hits both."""
    names = [first, *(v for v in models if v != first)]
    total = dict.fromkeys(names, 0.0)
    with torch.inference_mode():
        caches = {v: _cache(models[v][0]) for v in names}
        for v in names:
            _forward(models[v][0], inputs[v][0], models[v][1], caches[v])
        for j in range(len(inputs[first][1])):
            for v in (names if j % 2 == 0 else names[::-1]):
                model, is_embeds = models[v]
                t0 = time.perf_counter()
                _forward(model, inputs[v][1][j], is_embeds, caches[v])
                total[v] += time.perf_counter() - t0
    return total


def _check_equivalence(plain, protected, embed, plain_logits, ids: torch.Tensor) -> float:
    """Max |logit difference| between the plain model and the un-permuted protected model on one prompt."""
    with torch.inference_mode():
        a = plain(input_ids=ids, logits_to_keep=1).logits[0, -1]
        b = plain_logits(protected(inputs_embeds=embed(ids), logits_to_keep=1).logits[0, -1])
    return float((a - b).abs().max())


def run(plain, protected, embed, plain_logits, settings: dict, vocab_size: int, log=print) -> dict:
    """`embed(ids[B, T]) -> [B, T, d]` is the client's embedding (in the protected basis); `plain_logits` undoes the
    vocabulary permutation (only for the equivalence check). Returns a JSON-serialisable dict."""
    from bench.report import paired, summarize

    g = torch.Generator().manual_seed(0)
    repeats = settings["repeats"]
    configs = []
    for b, t in settings["prefill"]:
        ids = torch.randint(0, vocab_size, (b, t), generator=g)
        configs.append({"phase": "prefill", "batch": b, "tokens": t, "ids": ids, "embeds": embed(ids)})
    for b in settings["decode_batches"]:
        ctx = torch.randint(0, vocab_size, (b, settings["decode_context"]), generator=g)
        step_ids = [torch.randint(0, vocab_size, (b, 1), generator=g) for _ in range(settings["decode_steps"])]
        configs.append({"phase": "decode", "batch": b, "tokens": settings["decode_steps"],
                        "context": settings["decode_context"], "ids": (ctx, step_ids),
                        "embeds": (embed(ctx), [embed(s) for s in step_ids])})

    models = {"plain": (plain, False), "protected": (protected, True)}

    def pair(cfg, first: str) -> dict:
        inputs = {"plain": cfg["ids"], "protected": cfg["embeds"]}
        if cfg["phase"] == "decode":
            return time_decode_pair(models, inputs, first)
        order = (first, "protected" if first == "plain" else "plain")
        return {v: time_prefill(models[v][0], inputs[v], models[v][1]) for v in order}

    max_diff = _check_equivalence(plain, protected, lambda i: embed(i), plain_logits,
                                  torch.randint(0, vocab_size, (1, 16), generator=g))
    for cfg in configs:  # warm-up: first-call allocations, lazy init
        pair(cfg, "plain")

    times = {i: {"plain": [], "protected": []} for i in range(len(configs))}
    t_start = time.perf_counter()
    for r in range(repeats):
        for i, cfg in enumerate(configs):
            t = pair(cfg, "plain" if (r + i) % 2 == 0 else "protected")
            for variant in ("plain", "protected"):
                times[i][variant].append(t[variant])
        log(f"  server cost: repeat {r + 1}/{repeats} ({time.perf_counter() - t_start:.0f} s)")

    rows = []
    for i, cfg in enumerate(configs):
        n_tokens = cfg["batch"] * cfg["tokens"]
        tps = {v: [n_tokens / s for s in times[i][v]] for v in ("plain", "protected")}
        rows.append({
            "phase": cfg["phase"], "batch": cfg["batch"], "tokens": cfg["tokens"],
            **({"context": cfg["context"]} if cfg["phase"] == "decode" else {}),
            "plain_tokens_per_s": summarize(tps["plain"]),
            "protected_tokens_per_s": summarize(tps["protected"]),
            "ratio": paired(tps["protected"], tps["plain"]),
        })
    ratios = [r["ratio"]["median"] for r in rows]
    return {
        "engine": "transformers (in-process), fp32, DynamicCache, logits_to_keep=1",
        "inputs": "plain model: input_ids (its embedding lookup inside the forward); protected model: "
                  "inputs_embeds from the client bundle (the lookup is client-side in STIP, outside the timer)",
        "method": f"{repeats} repeats; prefill forwards alternate plain/protected (ABBA over repeats), decode "
                  f"alternates every step between two live KV caches (ABBA); ratio = median of the repeats' paired "
                  f"protected/plain throughput ratios",
        "settings": {k: v for k, v in settings.items()},
        "torch_threads": torch.get_num_threads(),
        "max_abs_logit_diff": max_diff,
        "rows": rows,
        "ratio_min": min(ratios),
        "ratio_median": statistics.median(ratios),
        "target_ratio": 0.98,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
