"""Drawing key parts from the CSPRNG (`KeyRng`): the per-layer permutations, the hardened parts, and the checks that
reject a draw which would leave a space unprotected or repeat an earlier layer's transform."""

from __future__ import annotations

import torch

from stip.common.keys.geometry import Geometry
from stip.common.transforms import KeyRng, SignedPermutation, pair_rotation_matrix, rope_pair_rotation

HARDEN_OPTIONS = ("mix", "rope", "vo", "ffn")  # see docs/hardened.md
MAX_DRAWS = 64  # redraws before giving up on a non-identity, distinct part
_DISTINCT_FROM = 8  # spaces this large have >= 8! transforms: every layer can get its own


def draw_layer_parts(g: Geometry, rng: KeyRng) -> dict:
    """One layer's permutations (LayerKey's fields): KV-group and query order, in-head Q/K and V, FFN, MoE experts."""
    if g.rope and g.qk_norm:  # one swap pattern (odd quarter-turns) per layer, each head's own signs
        turns = rng.integers(g.head_dim // 2, 4)
        qk = [rope_pair_rotation((turns + 2 * rng.integers(g.head_dim // 2, 2)) % 4, g.head_dim)
              for _ in range(g.kv_heads)]
    elif g.qk_norm:
        shared = rng.permutation(g.head_dim)
        qk = [SignedPermutation(shared) for _ in range(g.kv_heads)]
    elif g.rope:
        qk = [rope_pair_rotation(rng.integers(g.head_dim // 2, 4), g.head_dim) for _ in range(g.kv_heads)]
    else:
        qk = [SignedPermutation(rng.permutation(g.head_dim)) for _ in range(g.kv_heads)]
    return dict(
        kv_order=rng.permutation(g.kv_heads),
        q_order=torch.stack([rng.permutation(g.group) for _ in range(g.kv_heads)]),
        qk=qk,
        v=[SignedPermutation(rng.permutation(g.head_dim)) for _ in range(g.kv_heads)],
        ffn=SignedPermutation(rng.permutation(g.ffn)),
        experts=SignedPermutation(rng.permutation(g.experts)) if g.experts else None,
        expert_ffn=[SignedPermutation(rng.permutation(g.expert_ffn or g.ffn)) for _ in range(g.experts)]
        if g.experts else None,
    )


def draw_hardening(g: Geometry, rng: KeyRng, options: frozenset[str]) -> dict[str, torch.Tensor]:
    """One layer's hardened parts for `options` (a subset of "rope", "vo", "ffn"): qk_mix, vo_mix, ffn_scale."""
    parts = {}
    if "rope" in options:  # RoPE models: a random angle per pair; others (GPT-2): any orthogonal map per head
        if g.rope:
            angles = torch.from_numpy(rng.uniform(g.kv_heads * (g.head_dim // 2)) * 2 * torch.pi)
            parts["qk_mix"] = torch.stack([pair_rotation_matrix(a, g.head_dim)
                                           for a in angles.view(g.kv_heads, g.head_dim // 2)])
        else:
            parts["qk_mix"] = torch.stack([rng.orthogonal(g.head_dim) for _ in range(g.kv_heads)])
    if "vo" in options:  # orthogonal times exact power-of-two column scalings (2^-1..2^1): invertible, and
        # not norm-preserving
        parts["vo_mix"] = torch.stack([rng.orthogonal(g.head_dim) * torch.pow(2.0, rng.integers(g.head_dim, 4)
                                                                              .clamp(max=2).double() - 1)[None, :]
                                       for _ in range(g.kv_heads)])
    if "ffn" in options:
        parts["ffn_scale"] = (rng.integers(g.ffn, 8) - 4).to(torch.int8)  # k in [-4, 3]
    return parts


def draw_nontrivial(rng: KeyRng, n: int) -> SignedPermutation:
    """A permutation of n that is not the identity (for n >= 2)."""
    for _ in range(MAX_DRAWS):
        t = SignedPermutation(rng.permutation(n))
        if n < 2 or not t.is_identity():
            return t
    raise AssertionError("unreachable: CSPRNG returned the identity 64 times")


def distinct(spaces: dict[str, SignedPermutation], seen: list[dict[str, SignedPermutation]]) -> bool:
    """No space is the identity; no space of real size repeats an earlier layer's (tiny test spaces of 2-7 elements
    have too few permutations for that)."""
    for name, t in spaces.items():
        if len(t) > 1 and t.is_identity():
            return False
        if len(t) >= _DISTINCT_FROM and any(t.same_as(prev[name]) for prev in seen):
            return False
    return True
