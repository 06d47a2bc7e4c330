"""AloePri's RMSNorm correction: each obfuscated norm's weight is the scalar `c = E[rms(x P~) / rms(x)]`.

RMSNorm divides by the root mean square over the stream's width. The obfuscated stream `x P~` ([d+2h]) has another
norm than `x` ([d]) and is averaged over more dimensions, so the server's norm would scale its output wrongly; the
paper multiplies by `kappa = E[||x P|| / ||x||]` (our `c` also carries the width ratio: `c = kappa sqrt(d/(d+2h))`).
It is a constant, so it is right only on average: `||x P|| / ||x||` varies with the direction of `x` unless `P`
is a scaled orthogonal map (h = 0, lambda = 0), and that variation is the scheme's RMSNorm error.

The stream at a norm is a sum of pieces written with different key matrices (the embedding's, every o_proj's and
down_proj's `P`), so `c` is estimated per norm, on the hidden states of the plain model (run on the noisy
embedding, which is what the obfuscated model computes with): the plain stream is captured piece by piece and the
obfuscated one rebuilt from the same pieces.
"""

from __future__ import annotations

import math

import torch

from stip.developer.aloepri_keys import AloepriKey


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1).sqrt()


def calibration_ids(key: AloepriKey, tokens: int) -> torch.Tensor:
    """Token ids to estimate kappa on when the developer gives none: uniform random ids (from the key's CSPRNG),
    in sequences of 64."""
    n, vocab = max(1, math.ceil(tokens / 64)), key.geometry.vocab
    u = torch.from_numpy(key.rng("calibration").uniform(n * 64))
    return (u * vocab).long().clamp_max(vocab - 1).reshape(n, 64)


@torch.no_grad()
def plain_pieces(model, embedding: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Run the plain LLaMA-family `model` on the rows of `embedding` (float64, plain order) for `ids`; return the
    embedding rows ([N, d]) and, per layer, (input-norm input, o_proj output, post-attention-norm input, down_proj
    output) and last the final norm's input: float64, flattened over tokens."""
    captured: dict[str, torch.Tensor] = {}

    def keep(name, index):
        def hook(module, args, output=None):
            value = args[0] if index == "in" else output
            captured[name] = value.detach().double().reshape(-1, value.shape[-1])
        return hook

    base = model.model
    handles = [base.norm.register_forward_pre_hook(keep("final", "in"))]
    for i, layer in enumerate(base.layers):
        handles += [layer.input_layernorm.register_forward_pre_hook(keep(f"{i}.in", "in")),
                    layer.self_attn.o_proj.register_forward_hook(keep(f"{i}.o", "out")),
                    layer.post_attention_layernorm.register_forward_pre_hook(keep(f"{i}.post", "in")),
                    layer.mlp.down_proj.register_forward_hook(keep(f"{i}.down", "out"))]
    dtype = next(model.parameters()).dtype
    rows = embedding[ids]
    try:
        base(inputs_embeds=rows.to(dtype), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    layers = [tuple(captured[f"{i}.{part}"] for part in ("in", "o", "post", "down")) for i in range(len(base.layers))]
    return rows.reshape(-1, rows.shape[-1]), layers + [captured["final"]]


def estimate_kappa(key: AloepriKey, model, embedding: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """Each norm's `c` by canonical norm-weight name: the mean over calibration tokens of rms(x~) / rms(x), where x
    is the plain stream at that norm and x~ the same pieces each times its own key matrix."""
    embedded, pieces = plain_pieces(model, embedding, ids)
    *layers, final = pieces
    stream = embedded @ key.key_matrix("embed")
    out: dict[str, float] = {}

    def ratio(plain: torch.Tensor) -> float:
        return float((_rms(stream) / _rms(plain).clamp_min(1e-30)).mean())

    for i, (norm_in, o_out, post_in, down_out) in enumerate(layers):
        out[f"model.layers.{i}.input_layernorm.weight"] = ratio(norm_in)
        stream = stream + o_out @ key.key_matrix(f"layers.{i}.o_proj")
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = ratio(post_in)
        stream = stream + down_out @ key.key_matrix(f"layers.{i}.down_proj")
    out["model.norm.weight"] = ratio(final)
    return out


def obfuscated_eps(eps: float, kappa: dict[str, float]) -> float:
    """The server's RMSNorm epsilon: `eps c^2` (c's geometric mean over the norms), so that it weighs against the
    mean square over d+2h dims as `eps` did against the plain one."""
    logs = [math.log(c) for c in kappa.values()]
    return float(eps) * math.exp(2 * sum(logs) / len(logs))
