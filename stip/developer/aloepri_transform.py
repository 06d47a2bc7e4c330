"""AloePri's weight transforms for LLaMA-family decoders, one tensor at a time (PyTorch layout: `weight` is
[out, in], activations are row vectors, `y = x @ weight.T`).

The obfuscated residual stream is `x P` ([d+2h]). A tensor that reads it gets `weight @ Q^T` (because `P Q = I`), a
tensor that writes it gets `P^T @ weight` (bias: `bias @ P`). Every norm's weight is first folded into the linears
that read its output (`weight * w`), and the norm itself becomes the scalar `c` (kappa, stip.developer.aloepri_kappa)
times ones. On the other axis: Q/K heads get their RoPE-block rotation, paired scaling and block shuffle, V/O heads
`U_vo` and its inverse, and all heads move to their secret slots; gate/up rows and down columns move to the FFN's
secret neuron order, with up scaled and down unscaled. Everything is computed in float64; the caller rounds once.
"""

from __future__ import annotations

import re

import torch

from stip.developer.aloepri_keys import AloepriKey, AttentionKey
from stip.errors import UnsupportedModelError

_LAYER = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj\.(weight|bias)")
NORMS = re.compile(r"model\.(layers\.(\d+)\.(input_layernorm|post_attention_layernorm)|norm)\.weight")
EMBEDDING, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
_READERS = {"q": "input_layernorm", "k": "input_layernorm", "v": "input_layernorm",
            "gate": "post_attention_layernorm", "up": "post_attention_layernorm"}  # proj -> the norm it reads


def rope_pair_rows(t: torch.Tensor, angles: torch.Tensor, scale: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """One Q or K head's output rows ([head_dim, ...]): RoPE pair j is (j, j + head_dim/2); each pair is rotated by
    its angle (the same for Q and K, so q.k is unchanged, and a 2-D rotation commutes with RoPE's), scaled (Q by s,
    K by 1/s), and the pairs are moved to their shuffled slots."""
    half = t.shape[0] // 2
    shape = (-1,) + (1,) * (t.dim() - 1)
    cos, sin, s = angles.cos().view(shape), angles.sin().view(shape), scale.view(shape)
    a, b = t[:half], t[half:]
    a2, b2 = s * (cos * a - sin * b), s * (sin * a + cos * b)
    return torch.cat([a2[blocks], b2[blocks]])


def _heads(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape(n, t.shape[0] // n, *t.shape[1:])


def attention_outputs(kind: str, t: torch.Tensor, key: AttentionKey, group: int) -> torch.Tensor:
    """The out axis of q/k/v_proj (weight rows or bias) in the secret head order, each head transformed by its KV
    head's parts."""
    if kind == "v":
        heads = _heads(t, len(key.kv_order))
        return torch.cat([torch.tensordot(key.vo[h].T, heads[h], dims=1) for h in key.kv_order.tolist()])
    if kind == "k":
        heads, owners = _heads(t, len(key.kv_order)), key.kv_order.tolist()
        return torch.cat([rope_pair_rows(heads[h], key.angles[h], 1 / key.qk_scale[h], key.blocks[h])
                          for h in owners])
    heads = _heads(t, len(key.kv_order) * group)
    return torch.cat([rope_pair_rows(heads[q], key.angles[q // group], key.qk_scale[q // group],
                                     key.blocks[q // group]) for q in key.query_order(group).tolist()])


def attention_inputs_of_o(t: torch.Tensor, key: AttentionKey, group: int) -> torch.Tensor:
    """o_proj's in axis (columns, [d, heads * head_dim]): query heads in their secret slots, each times its KV
    head's `U_vo^-T`, which undoes `U_vo` on V's outputs."""
    n = len(key.kv_order) * group
    cols = t.reshape(t.shape[0], n, t.shape[1] // n)
    return torch.cat([cols[:, q] @ key.vo_inv[q // group].T for q in key.query_order(group).tolist()], dim=1)


class AloepriTransform:
    """Transforms each plain tensor (canonical name, float64) of a LLaMA-family checkpoint into the server's."""

    def __init__(self, key: AloepriKey, norms: dict[str, torch.Tensor], kappa: dict[str, float],
                 embedding: torch.Tensor, head: torch.Tensor):
        """`norms`: the plain norm weights by canonical name; `kappa`: each norm's scalar `c`; `embedding`: the
        noisy embedding table (plain order); `head`: the plain LM head (the embedding when tied)."""
        self.key, self.norms, self.kappa = key, norms, kappa
        self.embedding, self.head = embedding, head
        self._attention: tuple[int, AttentionKey] | None = None

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if name == EMBEDDING:
            return self.embedding[self.key.vocab] @ self.key.key_matrix("embed")
        if name == LM_HEAD:
            return self.lm_head()
        if NORMS.fullmatch(name):
            return torch.full((self.key.width,), self.kappa[name], dtype=torch.float64)
        m = _LAYER.fullmatch(name)
        if m is None:
            raise UnsupportedModelError(f"--harden aloepri: no rule for tensor {name!r}")
        layer, proj, part = int(m.group(1)), m.group(3), m.group(4)
        if proj in ("q", "k", "v"):
            return self._qkv(layer, proj, part, t)
        if proj == "o":
            return self._writes(f"layers.{layer}.o_proj", part,
                                t if part == "bias" else attention_inputs_of_o(t, self._attn(layer), self._group))
        return self._ffn(layer, proj, part, t)

    @property
    def _group(self) -> int:
        return self.key.geometry.group

    def _attn(self, layer: int) -> AttentionKey:
        if self._attention is None or self._attention[0] != layer:  # tensors of a layer come together
            self._attention = (layer, self.key.attention(layer))
        return self._attention[1]

    def _reads(self, layer: int, proj: str, t: torch.Tensor) -> torch.Tensor:
        """A weight that reads the stream after a norm: the norm's weight folded in, then `@ Q^T`."""
        w = self.norms[f"model.layers.{layer}.{_READERS[proj]}.weight"]
        return (t * w[None, :]) @ self.key.inverse_key_matrix(f"layers.{layer}.{proj}_proj").T

    def _writes(self, label: str, part: str, t: torch.Tensor) -> torch.Tensor:
        """A weight (or bias) that writes the stream: `P^T @ weight`, `bias @ P`."""
        p = self.key.key_matrix(label)
        return t @ p if part == "bias" else p.T @ t

    def _qkv(self, layer: int, proj: str, part: str, t: torch.Tensor) -> torch.Tensor:
        t = attention_outputs(proj, t, self._attn(layer), self._group)
        return t if part == "bias" else self._reads(layer, proj, t)

    def _ffn(self, layer: int, proj: str, part: str, t: torch.Tensor) -> torch.Tensor:
        f = self.key.ffn(layer)
        if proj == "down":
            if part == "bias":
                return self._writes(f"layers.{layer}.down_proj", part, t)
            return self._writes(f"layers.{layer}.down_proj", part, (t / f.scale[None, :])[:, f.order])
        if proj == "up":
            t = t * f.scale.view((-1,) + (1,) * (t.dim() - 1))
        t = t[f.order]
        return t if part == "bias" else self._reads(layer, proj, t)

    def lm_head(self) -> torch.Tensor:
        """`tau(W g + alpha_h sigma_h N) Q^T`: the final norm's weight g folded in, noise at alpha_h times the folded
        head's std, rows in the secret vocabulary order."""
        folded = self.head * self.norms["model.norm.weight"][None, :]
        alpha = self.key.options.alpha_h
        if alpha:
            folded = folded + alpha * float(folded.std()) * self.key.noise("lm_head", *folded.shape)
        return folded[self.key.vocab] @ self.key.inverse_key_matrix("lm_head").T


def noisy_embedding(key: AloepriKey, embedding: torch.Tensor) -> torch.Tensor:
    """`W_emb + alpha_e sigma_e N` (float64, plain order), sigma_e the table's std."""
    embedding = embedding.double()
    alpha = key.options.alpha_e
    if not alpha:
        return embedding
    return embedding + alpha * float(embedding.std()) * key.noise("embed", *embedding.shape)
