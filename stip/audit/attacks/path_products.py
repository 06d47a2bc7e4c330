"""Products of weights along a path inside one block, in which a mode's inner keys cancel (AloePri's key-invariant
products), paired with the public model's: the congruences `key_invariants` solves for the residual transform.

For LLaMA-family blocks, with `T` the residual transform (received = x T) and the norm weights folded into the
linears that read the stream:
- `QK = sum_h Wq_h^T Wk_h` (each query head with its KV head): `T^T QK T`. Head orders, in-head permutations and
  RoPE-pair rotations are the same on Q and K, so they cancel; this holds for any invertible `T`.
- `OV = Wo Wv` (V expanded to the query heads) and `DU = Wdown Wup`: `T^-1 OV T`, `T^-1 DU T`. V/O's invertible
  per-head map (`vo`) and the FFN's permutation and scalings (`ffn`) cancel.
A similarity is a congruence when `T` is orthogonal (every mode here), so the symmetric parts `X + X^T` and `X^T X`
are used, and `QK`'s symmetric part for any `T`.
"""

from __future__ import annotations

import re

import torch

from stip.audit.attacks.weight_pairs import linear_form

_BLOCK = re.compile(r"^(.*layers\.(\d+)\.)self_attn\.q_proj\.weight$")


def head_shape(config) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of a LLaMA-family config."""
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return heads, kv, head_dim


def _expand(w: torch.Tensor, heads: int, kv: int, head_dim: int) -> torch.Tensor:
    """[kv * hd, d] -> [heads * hd, d]: each query head gets its KV head's rows."""
    return w.view(kv, head_dim, -1).repeat_interleave(heads // kv, 0).reshape(heads * head_dim, -1)


def block_products(t: dict[str, torch.Tensor], prefix: str, shape: tuple[int, int, int],
                   fold: bool) -> dict[str, torch.Tensor] | None:
    """{"qk", "ov", "du"}: the block's path products ([d, d] float64), or None when a linear is missing."""
    heads, kv, head_dim = shape
    attn_norm, ffn_norm = f"{prefix}input_layernorm.weight", f"{prefix}post_attention_layernorm.weight"
    names = {n: f"{prefix}{n}.weight" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                  "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")}
    if any(name not in t for name in names.values()):
        return None
    q = linear_form(t, names["self_attn.q_proj"], attn_norm, False, fold)
    k = linear_form(t, names["self_attn.k_proj"], attn_norm, False, fold)
    v = linear_form(t, names["self_attn.v_proj"], attn_norm, False, fold)
    o = t[names["self_attn.o_proj"]].double()
    up = linear_form(t, names["mlp.up_proj"], ffn_norm, False, fold)
    down = t[names["mlp.down_proj"]].double()
    if q.shape[0] != heads * head_dim or k.shape[0] != kv * head_dim:
        return None
    return {"qk": q.T @ _expand(k, heads, kv, head_dim), "ov": o @ _expand(v, heads, kv, head_dim),
            "du": down @ up}


def product_pairs(bundle: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], shape, form: str,
                  max_layers: int | None = None, orthogonal: bool = True) -> tuple[list[str], list]:
    """(names, (public, bundle) symmetric float64 pairs) from every block both hold (the first `max_layers`)."""
    names, pairs = [], []
    for name in bundle:
        m = _BLOCK.match(name)
        if not m or (max_layers is not None and int(m.group(2)) >= max_layers):
            continue
        pub = block_products(ref, m.group(1), shape, form == "folded")
        own = block_products(bundle, m.group(1), shape, form == "folded")
        if pub is None or own is None:
            continue
        for kind in ("qk", "ov", "du"):
            a, b = pub[kind], own[kind]
            if a.shape != b.shape:
                continue
            names.append(f"layer {m.group(2)} {kind} sym")
            pairs.append(((a + a.T).numpy(), (b + b.T).numpy()))
            if orthogonal and kind != "qk":
                names.append(f"layer {m.group(2)} {kind} gram")
                pairs.append(((a.T @ a).numpy(), (b.T @ b).numpy()))
    order = sorted(range(len(names)), key=lambda i: [int(x) if x.isdigit() else x for x in names[i].split()])
    return [names[i] for i in order], [pairs[i] for i in order]
