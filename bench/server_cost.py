"""Server-side cost: the protected model against the plain model on the same engine (transformers, in-process, fp32).

The plain model is fed token ids (its own embedding lookup runs inside its forward); the protected model is fed
`inputs_embeds`, because in STIP the embedding lookup (and the secret permutation of the embeddings) happens on the
client: the embeddings are computed before the timer starts, as the server receives them ready-made. Everything
else is the same: one `DynamicCache` per batch, `logits_to_keep=1` (the server returns the last position's logits),
the same token ids, the same threads.

* prefill: B sequences of T tokens in one forward; tokens/s = B * T / seconds.
* decode: after an untimed prefill of `context` tokens, `steps` forwards of one token per sequence with the KV cache;
  tokens/s = B * steps / seconds (the sum of the timed forwards).

Variants are interleaved so that a drift in machine speed hits all alike: prefill forwards alternate between the
variants, the order rotating and reversing every repeat (ABBA for two); decode keeps every variant's KV cache live
side by side and alternates the order every step. Each repeat gives one paired ratio protected/plain, and the figure
is the median of those ratios (with its IQR and range). Target: >= 0.98.

Optionally (the full run) the same two models are measured again with their weights copied into freshly allocated
memory: `load_protected_model` leaves transformers' safetensors weights in a copy-on-write mapping of the file, and
decode at batch 1 is bound by memory bandwidth, so where the weights live shows at the percent level; the copied
pair separates that from the cost of the protection itself.
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


def _order(names: list[str], k: int) -> list[str]:
    """The k-th order of the variants: rotated by k // 2, reversed when k is odd (ABBA for two variants)."""
    r = (k // 2) % len(names)
    out = names[r:] + names[:r]
    return out[::-1] if k % 2 else out


def time_prefill_round(models: dict, inputs: dict, k: int) -> dict:
    """One prefill forward per variant, in the k-th order: {variant: seconds}."""
    return {v: time_prefill(models[v][0], inputs[v], models[v][1]) for v in _order(list(models), k)}


def time_decode_round(models: dict, inputs: dict, k: int) -> dict:
    """Decode every variant side by side, step by step (the order alternating every step), after an untimed prefill
    of the context: {variant: seconds summed over the timed steps}. Interleaving per step keeps the variants within
    milliseconds of each other, so a slow spell on the machine hits all of them."""
    names = list(models)
    total = dict.fromkeys(names, 0.0)
    with torch.inference_mode():
        caches = {v: _cache(models[v][0]) for v in names}
        for v in names:
            _forward(models[v][0], inputs[v][0], models[v][1], caches[v])
        for j in range(len(inputs[names[0]][1])):
            for v in _order(names, k + j):
                model, is_embeds = models[v]
                t0 = time.perf_counter()
                _forward(model, inputs[v][1][j], is_embeds, caches[v])
                total[v] += time.perf_counter() - t0
    return total


def copy_weights(model):
    """A copy of the model with every weight in freshly allocated process memory (a diagnostic: transformers leaves
    safetensors weights in a copy-on-write mapping of the file). Tied weights stay tied."""
    import copy

    return copy.deepcopy(model)


def _check_equivalence(plain, protected, embed, plain_logits, ids: torch.Tensor) -> float:
    """Max |logit difference| between the plain model and the un-permuted protected model on one prompt."""
    with torch.inference_mode():
        a = plain(input_ids=ids, logits_to_keep=1).logits[0, -1]
        b = plain_logits(protected(inputs_embeds=embed(ids), logits_to_keep=1).logits[0, -1])
    return float((a - b).abs().max())


def run(plain, protected, embed, plain_logits, settings: dict, vocab_size: int, log=print,
        copied: tuple | None = None) -> dict:
    """`embed(ids[B, T]) -> [B, T, d]` is the client's embedding (in the protected basis); `plain_logits` undoes the
    vocabulary permutation (only for the equivalence check). `copied`, optional: (plain, protected) again with their
    weights copied into process memory (`copy_weights`), measured as two more interleaved variants to tell the cost
    of the protection from that of where the weights live. Returns a JSON-serialisable dict."""
    from bench.report import paired, summarize

    g = torch.Generator().manual_seed(0)
    repeats = settings["repeats"]
    models = {"plain": (plain, False), "protected": (protected, True)}
    if copied:
        models |= {"plain_copied": (copied[0], False), "protected_copied": (copied[1], True)}
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

    def one_round(cfg, k: int) -> dict:
        inputs = {v: cfg["embeds"] if is_embeds else cfg["ids"] for v, (_, is_embeds) in models.items()}
        fn = time_decode_round if cfg["phase"] == "decode" else time_prefill_round
        return fn(models, inputs, k)

    max_diff = _check_equivalence(plain, protected, embed, plain_logits,
                                  torch.randint(0, vocab_size, (1, 16), generator=g))
    for cfg in configs:  # warm-up: first-call allocations, lazy init, page faults
        one_round(cfg, 0)

    times = {i: {v: [] for v in models} for i in range(len(configs))}
    t_start = time.perf_counter()
    for r in range(repeats):
        for i, cfg in enumerate(configs):
            for v, seconds in one_round(cfg, r + i).items():
                times[i][v].append(seconds)
        log(f"  server cost: repeat {r + 1}/{repeats} ({time.perf_counter() - t_start:.0f} s)")

    rows = []
    for i, cfg in enumerate(configs):
        n_tokens = cfg["batch"] * cfg["tokens"]
        tps = {v: [n_tokens / s for s in times[i][v]] for v in models}
        row = {"phase": cfg["phase"], "batch": cfg["batch"], "tokens": cfg["tokens"],
               **({"context": cfg["context"]} if cfg["phase"] == "decode" else {}),
               "plain_tokens_per_s": summarize(tps["plain"]),
               "protected_tokens_per_s": summarize(tps["protected"]),
               "ratio": paired(tps["protected"], tps["plain"])}
        if copied:
            row["plain_copied_tokens_per_s"] = summarize(tps["plain_copied"])
            row["protected_copied_tokens_per_s"] = summarize(tps["protected_copied"])
            row["ratio_copied"] = paired(tps["protected_copied"], tps["plain_copied"])
            row["protected_copied_vs_protected"] = paired(tps["protected_copied"], tps["protected"])
        rows.append(row)
    ratios = [r["ratio"]["median"] for r in rows]
    out = {
        "engine": "transformers (in-process), fp32, DynamicCache, logits_to_keep=1",
        "inputs": "plain model: input_ids (its embedding lookup inside the forward); protected model: "
                  "inputs_embeds from the client bundle (the lookup is client-side in STIP, outside the timer)",
        "loading": "plain: stip.models.load_plain_model; protected: stip.server.model.load_protected_model (what "
                   "`stip serve` runs)" + ("; *_copied: the same models with every weight copied into freshly "
                                           "allocated memory" if copied else ""),
        "method": f"{repeats} repeats; prefill: one forward per variant, the order rotating and reversing every "
                  f"repeat (ABBA); decode: every variant's KV cache live side by side, the order alternating every "
                  f"step; ratio = median of the repeats' paired protected/plain throughput ratios",
        "variants": list(models),
        "settings": {k: v for k, v in settings.items()},
        "torch_threads": torch.get_num_threads(),
        "max_abs_logit_diff": max_diff,
        "rows": rows,
        "ratio_min": min(ratios),
        "ratio_median": statistics.median(ratios),
        "target_ratio": 0.98,
    }
    if copied:
        rc = [r["ratio_copied"]["median"] for r in rows]
        out["ratio_copied_min"], out["ratio_copied_median"] = min(rc), statistics.median(rc)
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    return out
