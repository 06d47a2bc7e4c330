"""What a generation should be, computed on the plain model, for the engine parity tests (tests/test_vllm.py).

The sampler itself is checked against transformers' processors in tests/test_sampling.py; these helpers feed it the
plain model's own logits, so that a remote run (its logits from a protected bundle on some engine) must give the
same tokens, or, where the engine samples with its own random numbers, tokens the plain model allows.
"""

from __future__ import annotations

import torch

from stip.common.sampling import Sampler, SamplingParams

TOP_K = 64  # the client's default top-k downlink


def all_logits(model, ids: list[int]) -> torch.Tensor:
    """The plain model's logits [len(ids), V] at every position (float32)."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def reference_tokens(model, prompt: list[int], params: SamplingParams, n: int, stop: list[int] | tuple = (),
                     k: int | None = TOP_K) -> list[int]:
    """The tokens a client sampling with `params` draws when the server's logits are the plain model's: from its
    top-k pairs (`k`), or from all logits (`k` None: what a server-decode engine samples from). One forward per
    token over the model's own KV cache."""
    sampler, out = Sampler(params, prompt), []
    with torch.no_grad():
        step = model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        for _ in range(n):
            logits = step.logits[0, -1].float()
            if k is None:
                token = sampler.from_logits(logits)
            else:
                values, top = torch.topk(logits, k)
                token = sampler.from_topk(top, values)
            sampler.observe(token)
            out.append(token)
            if token in stop or len(out) == n:
                break
            step = model(torch.tensor([[token]]), past_key_values=step.past_key_values, use_cache=True)
    return out


def allowed(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> set[int]:
    """The tokens transformers' temperature, top-k and top-p warpers leave possible at one position."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    ids, _ = Sampler(params).candidates(logits)
    return set(ids.tolist())
