"""The per-layer key: one layer's head order, in-head Q/K and V transforms, FFN order (and MoE expert orders), the
full-axis transform of each of the layer's activation spaces built from them, and their layout in the key file."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stip.common.keys.draws import draw_hardening, draw_layer_parts
from stip.common.keys.file_format import perm_from, perm_tensors, stack_perms, unstack_perms
from stip.common.keys.geometry import Geometry
from stip.common.transforms import BlockDiagonal, Chain, Dense, KeyRng, Scale, SignedPermutation

HARDENED_PARTS = ("qk_mix", "vo_mix", "ffn_scale")


@dataclass
class LayerKey:
    """One layer's secret: KV-group order, query order inside each group, in-head Q/K and V transforms, FFN order;
    for MoE layers also the expert order and each expert's own FFN-neuron order."""

    kv_order: torch.Tensor  # [kv_heads]
    q_order: torch.Tensor  # [kv_heads, group]: query heads inside each (original) group
    qk: list[SignedPermutation]  # per original KV head, shared by its query heads
    v: list[SignedPermutation]  # per original KV head
    ffn: SignedPermutation
    experts: SignedPermutation | None = None  # slot k of the protected layer holds original expert experts.perm[k]
    expert_ffn: list[SignedPermutation] | None = None  # per original expert
    # hardened modes (docs/hardened.md), per ORIGINAL KV head; applied after the permutations above
    qk_mix: torch.Tensor | None = None  # [kv_heads, head_dim, head_dim] float64 orthogonal (RoPE: pair rotations)
    vo_mix: torch.Tensor | None = None  # [kv_heads, head_dim, head_dim] float64 invertible
    ffn_scale: torch.Tensor | None = None  # [ffn] int8: up_proj's rows scaled by 2^k, down_proj's columns by 2^-k

    def harden(self, g: Geometry, rng: KeyRng, options: frozenset[str]) -> None:
        """Draw this layer's hardened parts for `options` (a subset of "rope", "vo", "ffn")."""
        for part, value in draw_hardening(g, rng, options).items():
            setattr(self, part, value)

    def hardened(self, g: Geometry, name: str, base):
        """Space `name`'s transform with this layer's hardened parts after the permutation `base`."""
        kv_slots = self.kv_order.tolist()  # the original KV head at each protected KV slot
        q_slots = [src for src in kv_slots for _ in range(g.group)]  # ... and at each protected query slot

        def per_head(mats, slots, orthogonal=True):
            return Chain((base, BlockDiagonal(tuple(Dense(mats[s], orthogonal) for s in slots))))

        if name in ("attn_q", "attn_k") and self.qk_mix is not None:
            return per_head(self.qk_mix, q_slots if name == "attn_q" else kv_slots)
        if name in ("attn_v", "attn_o") and self.vo_mix is not None:
            return per_head(self.vo_mix, kv_slots if name == "attn_v" else q_slots, orthogonal=False)
        if name == "ffn_up" and self.ffn_scale is not None:
            return Chain((base, Scale(self.ffn_scale)))
        return base

    @property
    def is_hardened(self) -> bool:
        return any(getattr(self, part) is not None for part in HARDENED_PARTS)

    @classmethod
    def draw(cls, g: Geometry, rng: KeyRng) -> "LayerKey":
        return cls(**draw_layer_parts(g, rng))

    def spaces(self, g: Geometry) -> dict[str, SignedPermutation]:
        """The full-axis transform of every per-layer activation space, built from the compact parts."""
        kv = self.kv_order.tolist()
        kv_heads = [(src, src) for src in kv]  # (original KV head, original head on this axis)
        q_heads = [(src, src * g.group + r) for src in kv for r in self.q_order[src].tolist()]

        def heads(order, inner):
            return _gather_heads([(inner[src], h * g.head_dim) for src, h in order])

        spaces = {
            "attn_q": heads(q_heads, self.qk),
            "attn_k": heads(kv_heads, self.qk),
            "attn_v": heads(kv_heads, self.v),
            "attn_o": heads(q_heads, self.v),
            "ffn": self.ffn,
            "ffn_up": self.ffn,  # a SwiGLU's up projection (and down's input): "ffn", plus --harden ffn's scaling
        }
        spaces["attn_qkv"] = SignedPermutation.concat([spaces["attn_q"], spaces["attn_k"], spaces["attn_v"]])
        spaces["ffn_gate_up"] = SignedPermutation.concat([self.ffn, self.ffn])  # Phi-3's fused gate|up output
        if g.qk_norm:  # the dims of one head (a Q/K norm weight): the shared move, without the per-head signs
            spaces["attn_qk_head"] = SignedPermutation(self.qk[0].perm)
        if self.experts is not None:
            spaces["expert"] = self.experts
        return spaces

    def tensors(self, i: int) -> dict[str, torch.Tensor]:
        out = {f"layers.{i}.kv_order": self.kv_order, f"layers.{i}.q_order": self.q_order}
        out |= stack_perms(f"layers.{i}.qk", self.qk)
        out |= stack_perms(f"layers.{i}.v", self.v)
        out |= perm_tensors(f"layers.{i}.ffn", self.ffn)
        if self.experts is not None:
            out |= perm_tensors(f"layers.{i}.experts", self.experts)
            out |= stack_perms(f"layers.{i}.expert_ffn", self.expert_ffn)
        for part in HARDENED_PARTS:
            if getattr(self, part) is not None:
                out[f"layers.{i}.{part}"] = getattr(self, part)
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], i: int) -> "LayerKey":
        moe = f"layers.{i}.experts.perm" in t
        return cls(t[f"layers.{i}.kv_order"].long(), t[f"layers.{i}.q_order"].long(),
                   unstack_perms(t, f"layers.{i}.qk"), unstack_perms(t, f"layers.{i}.v"),
                   perm_from(t, f"layers.{i}.ffn"),
                   perm_from(t, f"layers.{i}.experts") if moe else None,
                   unstack_perms(t, f"layers.{i}.expert_ffn") if moe else None,
                   *(t.get(f"layers.{i}.{part}") for part in HARDENED_PARTS))


def _gather_heads(parts: list[tuple[SignedPermutation, int]]) -> SignedPermutation:
    """Output head k takes the source head starting at offset_k, transformed inside by its in-head transform."""
    perm = torch.cat([t.perm + offset for t, offset in parts])
    signs = [torch.ones(len(t), dtype=torch.int8) if t.sign is None else t.sign.to(torch.int8) for t, _ in parts]
    sign = torch.cat(signs)
    return SignedPermutation(perm, None if bool((sign > 0).all()) else sign)
