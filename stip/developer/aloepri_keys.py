"""AloePri's secret keys (Lin et al., arXiv 2603.01499, Algorithms 1 and 2), drawn from one 32-byte seed.

Every part comes from its own ChaCha20 stream, keyed by the seed and the part's label (`sub_rng`), so any part can be
drawn again, alone, in any order: the developer keeps only the seed. The parts:

- the key base (Algorithm 1's INIT): `B = U + lambda V` (U Haar-orthogonal, V ~ N(0, 1/d)), `E = E1 E2` and
  `F = F1 F2` of rank h/2 (rounded down) (entries N(0, 1/d)), `Z` Haar-orthogonal of size d + 2h;
- key matrices `P = [B C E] Z` (d x (d+2h)), one per tensor that writes the residual stream, each with its own `C`
  (rows in the left null space of `F`), and inverse key matrices `Q = Z^T [B^-1; F; D]` ((d+2h) x d), one per tensor
  that reads it, each with its own `D` (columns in the null space of `E`). Any `P` times any `Q` is the identity,
  because `C F = 0` and `E D = 0`: so the residual stream may sum outputs written with different `P`s;
- per layer, attention (Algorithm 2, per KV head): a rotation angle and a paired Q/K scaling per RoPE block, a
  shuffle of RoPE blocks inside windows, an invertible `U_vo` ~ N(0, 1/head_dim); and the head orders (KV heads, and
  one order of the query heads inside every group); the FFN's neuron order and up/down scalings;
- the secret vocabulary permutation `tau`, and the Gaussian noise matrices of the embedding and the LM head.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from stip.common.transforms import KeyRng
from stip.developer.aloepri_options import AloepriOptions

_DOMAIN = b"stip-aloepri/1\0"


def sub_rng(seed: bytes, label: str) -> KeyRng:
    """The CSPRNG of one key part: ChaCha20 under sha256(domain, seed, label)."""
    return KeyRng(hashlib.sha256(_DOMAIN + seed + label.encode()).digest())


def gaussian(rng: KeyRng, rows: int, cols: int, std: float = 1.0) -> torch.Tensor:
    """A [rows, cols] float64 matrix of independent N(0, std^2) entries."""
    return torch.from_numpy(rng.normal(rows * cols).reshape(rows, cols) * std)


def bulk_normal(rng: KeyRng, n: int) -> torch.Tensor:
    """n standard normal float64 numbers: Box-Muller over 53-bit uniforms from the CSPRNG, as `KeyRng.normal`, but
    computed by torch in place (the noise matrices hold tens of millions)."""
    pairs = (n + 1) // 2
    words = torch.frombuffer(bytearray(rng.random_bytes(16 * pairs)), dtype=torch.int64)
    u = ((words >> 11) & ((1 << 53) - 1)).double().add_(0.5).mul_(2.0 ** -53)
    radius = u[:pairs].log_().mul_(-2).sqrt_()
    angle = u[pairs:].mul_(2 * math.pi)
    return torch.cat([radius * angle.cos(), radius * angle.sin()])[:n]


def _null_basis(m: np.ndarray) -> np.ndarray:
    """An orthonormal basis (columns) of the orthogonal complement of `m`'s column space (m: [n, k], rank k)."""
    q, _ = np.linalg.qr(m, mode="complete")
    return q[:, m.shape[1]:]


@dataclass(frozen=True)
class AloepriGeometry:
    """The plain model's shapes the keys are drawn for."""

    hidden: int
    vocab: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    rope_freqs: tuple[float, ...]  # the RoPE frequency of each block (head_dim / 2 of them)

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


@dataclass
class KeyBase:
    """Algorithm 1's INIT: what every key matrix and inverse key matrix of one model shares."""

    b: torch.Tensor  # [d, d]
    b_inv: torch.Tensor
    e: torch.Tensor  # [d, h]
    f: torch.Tensor  # [h, d]
    z: torch.Tensor  # [d+2h, d+2h] orthogonal
    c_rows: torch.Tensor  # [h, h - h//2]: an orthonormal basis of {r : r F = 0} (every C's rows live there)
    d_cols: torch.Tensor  # [h, h - h//2]: an orthonormal basis of {c : E c = 0} (every D's columns live there)

    @classmethod
    def draw(cls, rng: KeyRng, d: int, h: int, lam: float) -> "KeyBase":
        std = 1 / math.sqrt(d)
        b = rng.orthogonal(d) + lam * gaussian(rng, d, d, std)
        rank = h // 2
        e1, e2 = gaussian(rng, d, rank, std), gaussian(rng, rank, h, std)
        f1, f2 = gaussian(rng, h, rank, std), gaussian(rng, rank, d, std)
        z = rng.orthogonal(d + 2 * h)
        c_rows = torch.from_numpy(_null_basis(f1.numpy())) if h else torch.zeros(0, 0, dtype=torch.float64)
        d_cols = torch.from_numpy(_null_basis(e2.T.numpy())) if h else torch.zeros(0, 0, dtype=torch.float64)
        return cls(b, torch.linalg.inv(b), e1 @ e2, f1 @ f2, z, c_rows, d_cols)

    @property
    def d(self) -> int:
        return self.b.shape[0]

    @cached_property
    def _fixed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The parts every P (and every Q) shares, multiplied out once: with Z's row blocks Z1 (d), Z2, Z3 (h each),
        P = (B Z1 + E Z3) + G (N_C^T Z2) and Q = (Z1^T B^-1 + Z2^T F) + (Z3^T N_D) G', where only the Gaussian
        coefficients G, G' differ from one P (Q) to the next."""
        d, h = self.d, self.e.shape[1]
        z1, z2, z3 = self.z[:d], self.z[d:d + h], self.z[d + h:]
        return self.b @ z1 + self.e @ z3, self.c_rows.T @ z2, z1.T @ self.b_inv + z2.T @ self.f, z3.T @ self.d_cols

    def key_matrix(self, rng: KeyRng) -> torch.Tensor:
        """KEYMATGEN: a fresh `P = [B C E] Z` ([d, d+2h]), with `C = G N_C^T`, G ~ N(0, 1/d) coefficients on the
        null basis."""
        fixed, c_to_stream, _, _ = self._fixed
        h = self.e.shape[1]
        return fixed + gaussian(rng, self.d, h - h // 2, 1 / math.sqrt(self.d)) @ c_to_stream if h else fixed

    def inverse_key_matrix(self, rng: KeyRng) -> torch.Tensor:
        """INVKEYMATGEN: a fresh `Q = Z^T [B^-1; F; D]` ([d+2h, d]), with `D = N_D G'`, so that `P Q = I` for every
        `P`."""
        _, _, fixed, stream_to_d = self._fixed
        h = self.f.shape[0]
        return fixed + stream_to_d @ gaussian(rng, h - h // 2, self.d, 1 / math.sqrt(self.d)) if h else fixed


@dataclass
class AttentionKey:
    """One layer's attention parts. Per KV head (indexed by the ORIGINAL head): RoPE-block angles, paired Q/K
    scalings (Q's block times s, K's times 1/s), the block shuffle (slot t holds original block `blocks[t]`) and
    `U_vo`. The head orders: KV slot k holds original KV head `kv_order[k]`; inside every group, query slot j holds
    the group's original query head `group_order[j]`."""

    angles: torch.Tensor  # [kv_heads, head_dim/2]
    qk_scale: torch.Tensor  # [kv_heads, head_dim/2]
    blocks: torch.Tensor  # [kv_heads, head_dim/2] long
    vo: torch.Tensor  # [kv_heads, head_dim, head_dim]
    kv_order: torch.Tensor  # [kv_heads] long
    group_order: torch.Tensor  # [group] long

    def query_order(self, group: int) -> torch.Tensor:
        """Query slot -> original query head."""
        return (self.kv_order[:, None] * group + self.group_order[None, :]).reshape(-1)

    @cached_property
    def vo_inv(self) -> torch.Tensor:
        return torch.linalg.inv(self.vo)


@dataclass
class FfnKey:
    order: torch.Tensor  # [ffn] long: slot t holds original neuron order[t]
    scale: torch.Tensor  # [ffn]: up's row (and 1 / down's column) scaling, per original neuron


def log_uniform(rng: KeyRng, n: int, scale: float) -> torch.Tensor:
    """n factors log-uniform in [1/scale, scale] (all 1 when scale is 1)."""
    return torch.from_numpy(np.exp((2 * rng.uniform(n) - 1) * math.log(scale)))


def block_shuffle(rng: KeyRng, freqs: tuple[float, ...], beta: int, gamma: float) -> torch.Tensor:
    """Algorithm 2's BLOCKPERM: RoPE blocks cut into consecutive windows, each shuffled uniformly. A window from
    block t takes size w (1..min(beta, left)) with probability softmax(gamma * (freq[t+w-1] - freq[t])): where the
    frequencies fall fast (the first blocks) windows stay single blocks; among the slow blocks, whose rotation barely
    moves over a context, they grow to beta. (Our reading of the printed algorithm: it leaves gamma and the loop's
    step implicit.)"""
    m, t, order = len(freqs), 0, []
    while t < m:
        c = min(beta, m - t)
        gaps = np.array([freqs[t + w - 1] - freqs[t] for w in range(1, c + 1)]) * gamma
        u = np.exp(gaps - gaps.max())
        u /= u.sum()
        w = 1 + int(np.searchsorted(np.cumsum(u), rng.uniform(1)[0] * u.sum(), side="right").clip(0, c - 1))
        order += (t + rng.permutation(w)).tolist()
        t += w
    return torch.tensor(order, dtype=torch.long)


class AloepriKey:
    """All of a model's secrets, drawn on demand from `seed` (see the module docstring for the labels)."""

    def __init__(self, seed: bytes, options: AloepriOptions, geometry: AloepriGeometry):
        if len(seed) != 32:
            raise ValueError("an AloePri seed is 32 bytes")
        self.seed, self.options, self.geometry = seed, options, geometry

    def rng(self, label: str) -> KeyRng:
        return sub_rng(self.seed, label)

    @cached_property
    def base(self) -> KeyBase:
        return KeyBase.draw(self.rng("base"), self.geometry.hidden, self.options.h, self.options.lam)

    @property
    def width(self) -> int:
        """The obfuscated residual stream's width, d + 2h."""
        return self.geometry.hidden + 2 * self.options.h

    def key_matrix(self, label: str) -> torch.Tensor:
        """`P` for the tensor that writes the residual stream under `label` ("embed", "layers.3.o_proj", ...)."""
        return self.base.key_matrix(self.rng(f"P/{label}"))

    def inverse_key_matrix(self, label: str) -> torch.Tensor:
        """`Q` for the tensor that reads the residual stream under `label` ("lm_head", "layers.3.q_proj", ...)."""
        return self.base.inverse_key_matrix(self.rng(f"Q/{label}"))

    @cached_property
    def vocab(self) -> torch.Tensor:
        """tau: server id s holds original token vocab[s]."""
        return self.rng("vocab").permutation(self.geometry.vocab)

    def noise(self, label: str, rows: int, cols: int) -> torch.Tensor:
        """The N(0, 1) noise matrix of the embedding ("embed") or the LM head ("lm_head"), float64."""
        return bulk_normal(self.rng(f"noise/{label}"), rows * cols).reshape(rows, cols)

    def attention(self, layer: int) -> AttentionKey:
        g, o = self.geometry, self.options
        rng = self.rng(f"attention/{layer}")
        half = g.head_dim // 2
        angles = torch.from_numpy(2 * math.pi * rng.uniform(g.kv_heads * half).reshape(g.kv_heads, half))
        scale = log_uniform(rng, g.kv_heads * half, o.scale).reshape(g.kv_heads, half)
        blocks = torch.stack([block_shuffle(rng, g.rope_freqs, o.beta, o.gamma) for _ in range(g.kv_heads)])
        vo = torch.stack([gaussian(rng, g.head_dim, g.head_dim, 1 / math.sqrt(g.head_dim))
                          for _ in range(g.kv_heads)])
        return AttentionKey(angles, scale, blocks, vo, rng.permutation(g.kv_heads), rng.permutation(g.group))

    def ffn(self, layer: int) -> FfnKey:
        rng = self.rng(f"ffn/{layer}")
        return FfnKey(rng.permutation(self.geometry.ffn), log_uniform(rng, self.geometry.ffn, self.options.scale))
