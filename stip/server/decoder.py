"""A packed forward for the supported decoders: many sessions' new tokens in one pass, each over its own KV cache.

The tokens of every row of a tick are packed into one sequence [1, N, d]: norms, projections, MLPs and the LM head
(the weight-bound work) run once over all N tokens. Attention alone runs per row, over that row's own cache, with
the causal mask shifted by the row's cached length, so no padding and no cross-row mask is needed, and each row's
attention does exactly what a solo run does. The weights and the submodules (norms, MLP, rotary embedding, RoPE
application) are the loaded transformers model's own, so variants (QKV bias, activations, RoPE scaling) follow it.

Families: llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe (RMSNorm, RoPE, GQA, optional QKV bias,
sliding window; Qwen3's Q/K norms act per head and token; an MoE block routes each packed token on its own) and gpt2
(LayerNorm, Conv1D, learned positions: the server's `wpe` is zero in a protected bundle, and it is added like
transformers does; `scale_attn_by_inverse_layer_idx` through the attention's own scaling, and
`reorder_and_upcast_attn` as transformers' eager attention computes it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stip.errors import StipError

# MoE blocks route each packed token on its own; Qwen3's Q/K norms act per head, on each token alone
ROPE_FAMILIES = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "qwen3", "qwen3_moe")
FAMILIES = ROPE_FAMILIES + ("gpt2",)
# RoPE variants whose frequencies depend on the longest position in the batch: packing rows would change them.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


@dataclass
class Row:
    """One row of a tick: `t` new tokens appended after `start` cached ones, in the KV tensor `kv`."""

    kv: torch.Tensor  # [layers, 2, kv_heads, capacity, head_dim], capacity >= start + t
    start: int
    t: int


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def _upcast_attention(q, k, v, mask, scale: float, causal: bool) -> torch.Tensor:
    """GPT-2's reorder_and_upcast_attn, as transformers computes it: scores (scale folded in) and softmax in
    float32, the weights cast back to v's dtype before they meet v."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        n, m = q.shape[-2], k.shape[-2]
        mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


class PackedDecoder:
    """Runs the loaded transformers model's weights over packed rows; see the module docstring."""

    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.family = str(getattr(cfg, "model_type", ""))
        self.upcast = False  # attention scores in float32 whatever the dtype (GPT-2's reorder_and_upcast_attn)
        if self.family not in FAMILIES:
            raise StipError(f"the batched engine supports {', '.join(FAMILIES)}, not {self.family!r}; "
                            f"use --no-batching")
        if self.family == "gpt2":
            base = model.transformer
            self.layers, self.final_norm = list(base.h), base.ln_f
            attn = self.layers[0].attn
            self.q_heads = self.kv_heads = attn.num_heads
            self.head_dim = attn.head_dim
            self.wpe = base.wpe
            if getattr(cfg, "add_cross_attention", False):
                raise StipError("the batched engine does not run GPT-2 with cross-attention; use --no-batching")
            self.upcast = bool(getattr(cfg, "reorder_and_upcast_attn", False))
            expected = (self.head_dim ** -0.5 if getattr(cfg, "scale_attn_weights", True) else 1.0) / (
                len(self.layers) if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) else 1)
            if abs(self.layers[-1].attn.scaling - expected) > 1e-6 * expected:  # this transformers folds the flags
                raise StipError("this transformers version's GPT-2 attention does not fold scale_attn_weights and "
                                "scale_attn_by_inverse_layer_idx into its scaling; use --no-batching")
        else:
            base = model.model
            self.layers, self.final_norm = list(base.layers), base.norm
            self.rotary = base.rotary_emb
            rope = getattr(cfg, "rope_parameters", None) or {}
            rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
            if rope_type in LENGTH_DEPENDENT_ROPE:
                raise StipError(f"the batched engine does not support {rope_type!r} RoPE scaling (its frequencies "
                                f"depend on the batch's longest row); use --no-batching")
            attn = self.layers[0].self_attn
            self.head_dim = attn.head_dim
            self.q_heads = int(cfg.num_attention_heads)
            self.kv_heads = int(cfg.num_key_value_heads)
            self.apply_rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
            # a layer's own window, else the config's where the layer slides (Qwen2-MoE's full-attention layers
            # have no attribute, and a config window of 0 there); 0 or None: no window
            types = getattr(cfg, "layer_types", None)
            self.windows = [getattr(layer.self_attn, "sliding_window",
                                    None if types and types[i] != "sliding_attention"
                                    else getattr(cfg, "sliding_window", None)) or None
                            for i, layer in enumerate(self.layers)]
        self.groups = self.q_heads // self.kv_heads
        self.lm_head = model.get_output_embeddings()

    def kv_shape(self, capacity: int) -> tuple[int, ...]:
        return (len(self.layers), 2, self.kv_heads, capacity, self.head_dim)

    # ------------------------------------------------------------ attention

    def _attend(self, q, k, v, rows: list[Row], layer: int, scale: float, window: int | None,
                upcast: bool = False) -> torch.Tensor:
        """q [1, Hq, N, hd], k/v [1, Hkv, N, hd] of the packed tokens -> [1, N, Hq*hd]; writes each row's cache.
        `upcast` (GPT-2's reorder_and_upcast_attn): scores and softmax in float32, whatever the model's dtype."""
        outs, a = [], 0
        for r in rows:
            b, end = a + r.t, r.start + r.t
            cache = r.kv[layer]
            cache[0, :, r.start:end] = k[0, :, a:b]
            cache[1, :, r.start:end] = v[0, :, a:b]
            keys, values = cache[0, :, :end].unsqueeze(0), cache[1, :, :end].unsqueeze(0)
            qr = q[:, :, a:b]
            mask = None
            needs_window = window is not None and end > window
            if r.t > 1 and (r.start > 0 or needs_window):
                qpos = torch.arange(r.start, end, device=q.device)[:, None]
                kpos = torch.arange(end, device=q.device)[None, :]
                mask = kpos <= qpos
                if needs_window:
                    mask = mask & (kpos > qpos - window)
            elif r.t == 1 and needs_window:
                keys, values = keys[:, :, end - window:], values[:, :, end - window:]
            # As transformers' sdpa path does: grouped-query heads natively without a mask, repeated with one.
            kw = {}
            if self.groups > 1:
                if mask is None:
                    kw["enable_gqa"] = True
                else:
                    keys, values = _repeat_kv(keys, self.groups), _repeat_kv(values, self.groups)
            if upcast:
                out = _upcast_attention(qr, keys, values, mask, scale, causal=mask is None and r.t > 1)
            else:
                out = F.scaled_dot_product_attention(qr, keys, values, attn_mask=mask, scale=scale,
                                                     is_causal=mask is None and r.t > 1, **kw)
            outs.append(out.transpose(1, 2))
            a = b
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return out.reshape(1, out.shape[1], -1)

    # ------------------------------------------------------------ layers

    def _rope_layer(self, i: int, layer, h, cos, sin, rows) -> torch.Tensor:
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        n = x.shape[1]
        q = attn.q_proj(x).view(1, n, -1, self.head_dim)
        k = attn.k_proj(x).view(1, n, -1, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head's dims, before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = attn.v_proj(x).view(1, n, -1, self.head_dim).transpose(1, 2)
        q, k = self.apply_rope(q, k, cos, sin)
        h = h + attn.o_proj(self._attend(q, k, v, rows, i, attn.scaling, self.windows[i]))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _gpt2_layer(self, i: int, layer, h, rows) -> torch.Tensor:
        attn = layer.attn
        x = layer.ln_1(h)
        n = x.shape[1]
        q, k, v = (t.view(1, n, -1, self.head_dim).transpose(1, 2)
                   for t in attn.c_attn(x).split(attn.split_size, dim=2))
        # attn.scaling folds in scale_attn_weights and scale_attn_by_inverse_layer_idx (1 / (layer + 1))
        h = h + attn.c_proj(self._attend(q, k, v, rows, i, attn.scaling, None, self.upcast))
        return h + layer.mlp(layer.ln_2(h))

    @torch.inference_mode()
    def forward(self, embeds: torch.Tensor, rows: list[Row], keep: torch.Tensor, observe=None) -> torch.Tensor:
        """embeds [N, d]: the rows' new tokens, packed in row order. Returns logits [len(keep), V] (model dtype)
        for the packed positions in `keep`; each row's cache gets its new keys and values. `observe(i, h)`, if
        given, sees the packed hidden state [1, N, d] after layer i (`stip serve --capture`)."""
        positions = torch.cat([torch.arange(r.start, r.start + r.t) for r in rows]).to(embeds.device).unsqueeze(0)
        h = embeds.unsqueeze(0)
        if self.family == "gpt2":
            h = h + self.wpe(positions).to(h.dtype)
            for i, layer in enumerate(self.layers):
                h = self._gpt2_layer(i, layer, h, rows)
                if observe is not None:
                    observe(i, h)
        else:
            cos, sin = self.rotary(h, positions)
            for i, layer in enumerate(self.layers):
                h = self._rope_layer(i, layer, h, cos, sin, rows)
                if observe is not None:
                    observe(i, h)
        h = self.final_norm(h[:, keep])
        return self.lm_head(h)[0]
