"""What the weight-pair attacks (`gram_congruence`, `key_invariants`, `ridge_inversion`, `arrowmatch`) share: the
linears of the server bundle paired with the public model's by name, in the form a mode leaves them (the preceding
norm weight folded in, or not), and the decode of the captured traffic once the residual transform is known.

A protected linear that reads the residual stream is `W' = P W T`: the public `W` (times the norm weight before it,
where a mode folds it in), its outputs moved by some secret `P` and its inputs by the residual transform `T`, the map
with `received row = x T`. Folding the bundle's own norm weight into `W'` (weights of ones where the mode already
folded it) and the public norm weight into `W` gives that form in the paper's scheme and in the hardened ones alike;
the raw form (no folding on either side) is tried too, and the attacks keep whichever fits.
"""

from __future__ import annotations

import re

import torch

from stip.audit.attacks.common import columns_recovered, nearest_rows, observed, reference_embedding, \
    truth_residual

# LLaMA-family linears reading the residual stream, and GPT-2's (Conv1D, stored [in, out]); the norm before each.
_READERS = (
    (re.compile(r"^(.*\.)self_attn\.(q_proj|k_proj|v_proj|qkv_proj)\.weight$"), "input_layernorm", False),
    (re.compile(r"^(.*\.)mlp\.(gate_proj|up_proj|gate_up_proj)\.weight$"), "post_attention_layernorm", False),
    (re.compile(r"^(.*\.)attn\.c_attn\.weight$"), "ln_1", True),
    (re.compile(r"^(.*\.)mlp\.c_fc\.weight$"), "ln_2", True),
)
_FINAL_NORMS = ("model.norm.weight", "transformer.ln_f.weight", "model.final_layernorm.weight")
FORMS = ("folded", "raw")


def reading_linears(names) -> list[tuple[str, str | None, bool]]:
    """(weight name, name of the norm weight before it, stored transposed) for every linear reading the residual
    stream, the LM head last."""
    names = set(names)
    out = []
    for name in sorted(names, key=_natural):
        for pattern, norm, transposed in _READERS:
            m = pattern.match(name)
            if m:
                norm_name = f"{m.group(1)}{norm}.weight"
                out.append((name, norm_name if norm_name in names else None, transposed))
    if "lm_head.weight" in names:
        final = [n for n in _FINAL_NORMS if n in names]
        out.append(("lm_head.weight", final[0] if final else None, False))
    return out


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def linear_form(tensors: dict[str, torch.Tensor], name: str, norm: str | None, transposed: bool,
                fold: bool) -> torch.Tensor:
    """[out, in] float64: the linear as stored, with the norm weight before it folded into its inputs if `fold`."""
    w = tensors[name].double()
    w = w.T if transposed else w
    if fold and norm is not None and norm in tensors and tensors[norm].shape[0] == w.shape[1]:
        w = w * tensors[norm].double()
    return w


def reference_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def paired_linears(bundle: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], form: str,
                   max_layers: int | None = None):
    """Yields (name, public W, bundle W') for every reading linear both hold with the same shape, in `form`; with
    `max_layers`, only the linears of the first `max_layers` blocks (and the LM head). One at a time: float64
    copies of every linear of a real model would not fit in memory together."""
    for name, norm, transposed in reading_linears(bundle):
        if name not in ref or ref[name].shape != bundle[name].shape:
            continue
        layer = re.search(r"\.(\d+)\.", name)
        if max_layers is not None and layer and int(layer.group(1)) >= max_layers:
            continue
        fold = form == "folded"
        yield (name, linear_form(ref, name, norm, transposed, fold), linear_form(bundle, name, norm, transposed, fold))


# Linears whose outputs a mode only permutes: their column sums are invariant, `1^T W' = (1^T W) T`. Every other
# constraint here is quadratic in T, so these fix its global sign.
PERMUTED_OUTPUTS = ("lm_head.weight", "mlp.gate_proj.weight", "mlp.c_fc.weight")


def column_sums(linears) -> list[tuple]:
    """(public, bundle) column sums (float64 numpy) of the paired linears whose outputs are only permuted."""
    return [(w.sum(0).numpy(), w2.sum(0).numpy()) for name, w, w2 in linears if name.endswith(PERMUTED_OUTPUTS)]


def observed_positions(ctx) -> torch.Tensor | None:
    """[N, d] learned position rows (GPT-2) the client added to each observed row before the transform, or None."""
    from stip.audit.attacks.vocab_matching import position_rows

    starts = [(int(o.meta.get("start", 0)), o.inputs.shape[0]) for o in ctx.observations]
    if not starts:
        return None
    pos = position_rows(ctx.reference, max(s + n for s, n in starts))
    return None if pos is None else torch.cat([pos[s:s + n] for s, n in starts])


def truth_tokens(ctx) -> torch.Tensor:
    """The auditor's token ids of every observed row, in order (scoring only)."""
    return torch.cat([ids.long() for ids in ctx.truth.ids]) if ctx.truth.ids else torch.empty(0, dtype=torch.long)


def decode_plain(ctx, plain: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Token ids of plaintext rows: the learned positions taken off, then the nearest public embedding row."""
    plain = plain.float()
    if positions is not None:
        plain = plain - positions
    return nearest_rows(plain, reference_embedding(ctx))[0]


def decode_traffic(ctx, transform: torch.Tensor) -> tuple[float | None, int]:
    """(share of observed tokens decoded, rows): each received row times the inverse of `transform` (received =
    x T), then the nearest public embedding row."""
    rows, _ = observed(ctx)
    if not rows.numel():
        return None, 0
    plain = torch.linalg.solve(transform.double().T, rows.double().T).T  # rows @ T^-1
    got = decode_plain(ctx, plain, observed_positions(ctx))
    return float((got == truth_tokens(ctx)).float().mean()), int(rows.shape[0])


def transform_scores(ctx, estimate: torch.Tensor) -> dict:
    """How much of the true residual transform an estimate holds (the auditor's key; scoring only)."""
    truth = truth_residual(ctx.truth.bundle_dir)
    if truth is None:
        return {"key_relative_error": None, "key_note": "not scored: the client key does not hold this mode's "
                                                        "residual transform (AloePri)"}
    truth, estimate = truth.double(), estimate.double()
    if estimate.shape != truth.shape:
        return {"key_relative_error": None}
    exact, within = columns_recovered(estimate.float(), truth.float())
    return {"key_columns_exact": exact, "key_columns_within_5pct": within,
            "key_relative_error": float((estimate - truth).norm() / truth.norm())}
