"""The reference three-party path, all in one process: plain model vs. protected model driven by the client bundle.

This is the simple path the networked runtime is tested against (as Opacus tests its fast path against a reference):
client embeds and permutes, the protected model runs, the client un-permutes. It plays the developer (the plain
model) and the client (`ClientBundle`) at once, by design, so it sits above the parties, beside `cli` and `demo`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stip.client.bundle import ClientBundle


@dataclass
class Equivalence:
    max_abs_diff: float
    logit_scale: float
    top1_match: float  # fraction of positions with the same argmax
    tokens: int


@torch.no_grad()
def compare_logits(plain_model, protected_model, client: ClientBundle, ids: torch.Tensor) -> Equivalence:
    """Full-sequence logits of both models on the same token ids ([B, T])."""
    ref = plain_model(input_ids=ids).logits.float()
    out = client.plain_logits(protected_model(inputs_embeds=client.embed(ids)).logits.float())
    return Equivalence(float((ref - out).abs().max()), float(ref.abs().max()),
                       float((ref.argmax(-1) == out.argmax(-1)).float().mean()), int(ids.numel()))


@torch.no_grad()
def protected_greedy(protected_model, client: ClientBundle, prompt_ids: list[int], max_new_tokens: int,
                     stop_ids: list[int] | None = None) -> list[int]:
    """Greedy generation with the KV cache, one client-embedded token per step."""
    from transformers import DynamicCache

    cache = DynamicCache()
    ids = torch.tensor([prompt_ids])
    logits = protected_model(inputs_embeds=client.embed(ids), past_key_values=cache, use_cache=True).logits[:, -1]
    out: list[int] = []
    pos = len(prompt_ids)
    for _ in range(max_new_tokens):
        nxt = int(client.plain_logits(logits.float()).argmax(-1))
        out.append(nxt)
        if stop_ids and nxt in stop_ids:
            break
        step = client.embed(torch.tensor([[nxt]]), start=pos)
        logits = protected_model(inputs_embeds=step, past_key_values=cache, use_cache=True).logits[:, -1]
        pos += 1
    return out


@torch.no_grad()
def plain_greedy(plain_model, prompt_ids: list[int], max_new_tokens: int,
                 stop_ids: list[int] | None = None) -> list[int]:
    """transformers' own `generate`, greedy: the ground truth."""
    ids = torch.tensor([prompt_ids])
    out = plain_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               do_sample=False, eos_token_id=stop_ids or None, pad_token_id=(stop_ids or [0])[0])
    return out[0, len(prompt_ids):].tolist()
