"""Is TEE mode lossless in bench.tee_latency's own run? The enclave's logits (its part in the benchmark's process,
over the running worker's WebSocket, pads from its pool) against the plain model's at every step of the generation
the benchmark timed, teacher-forced on its tokens: the max-abs logit difference, and whether the plain model's
argmax is the TEE token at every step (then plain greedy generation is the same sequence, step by step).

bench/tee_precision.py compares the ways of computing the padded products on several prompts; this is the check on
the timed configuration itself.
"""

from __future__ import annotations

import torch


def plain_model(model: str):
    """The unprotected model bench.tee_latency protected: SmolLM2 from its package, or the tiny model with the
    seed `tests.models.save_tiny` saved."""
    if model == "smollm2":
        from stip.models import load_plain_model

        return load_plain_model("smollm2")[0].eval()
    from tests.models import build_tiny

    return build_tiny(model).eval()


@torch.no_grad()
def check(enclave, plain, ids: list[int], tokens: list[int]) -> dict:
    """`enclave` (an EnclaveModel) and `plain` on the prompt `ids` followed by the generated `tokens`."""
    s = enclave.new_session()
    try:
        got = [enclave.prefill(s, ids)] + [enclave.decode(s, t) for t in tokens[:-1]]
    finally:
        enclave.close(s)
    got = torch.stack(got).float()
    want = plain(torch.tensor([list(ids) + list(tokens[:-1])])).logits[0, len(ids) - 1:].float()
    return {"steps": len(tokens), "max_abs_logit_diff": float((got - want).abs().max()),
            "greedy_equal": want.argmax(-1).tolist() == list(tokens) and got.argmax(-1).tolist() == list(tokens)}


def markdown(r: dict | None) -> list[str]:
    if not r:
        return []
    return [f"Lossless (the enclave's logits against the plain float32 model's at each of the {r['steps']} steps, "
            f"teacher-forced on the TEE tokens; bench.tee_lossless): greedy equal to plain: {r['greedy_equal']}; "
            f"max-abs logit difference {r['max_abs_logit_diff']:.2g}."]
