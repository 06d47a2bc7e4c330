"""The linear algebra both sides of TEE mode's offload share: a linear module's `W` and `b`, the float64 product
the worker computes on padded rows, and the secret monomial bases `A`, `B` of the worker's copy of block 0
(`W' = B W A^-1`): the developer draws them, the enclave undoes them (docs/tee.md, "The split")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

OFFLOAD_DTYPE = torch.float64  # the padded products, on both sides: exact to float32 after the subtraction
MASK_EXPONENTS = (-2, -1, 0, 1)  # mask scales are +-2^k, k from these: exact in float, so W' = B W A^-1 is exact


def is_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2) stores its weight as [in, out]."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def weight_of(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(W as [out, in], bias) of a linear module, else None."""
    if isinstance(m, nn.Linear):
        return m.weight, m.bias
    if is_conv1d(m):
        return m.weight.t(), m.bias
    return None


def linear64(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """x [n, in] @ W^T (+ b) in float64: what the worker computes on padded rows."""
    y = x.to(OFFLOAD_DTYPE) @ weight.to(OFFLOAD_DTYPE).t()
    return y if bias is None else y + bias.to(OFFLOAD_DTYPE)


@dataclass
class Monomial:
    """`y[..., j] = scale[j] * x[..., perm[j]]`: a permutation times signs and powers of two (a secret basis of the
    worker's copy of block 0). Exact in floating point: applying or inverting it never rounds."""

    perm: torch.Tensor
    scale: torch.Tensor  # float64, entries +-2^k

    @classmethod
    def draw(cls, n: int, rng) -> "Monomial":
        """From a CSPRNG (`stip.common.transforms.KeyRng`)."""
        k = torch.tensor(MASK_EXPONENTS, dtype=OFFLOAD_DTYPE)[rng.integers(n, len(MASK_EXPONENTS)).long()]
        sign = rng.integers(n, 2).to(OFFLOAD_DTYPE) * 2 - 1
        return cls(rng.permutation(n), sign * torch.exp2(k))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], name: str) -> "Monomial | None":
        if f"{name}.perm" not in tensors:
            return None
        return cls(tensors[f"{name}.perm"].long(), tensors[f"{name}.scale"].to(OFFLOAD_DTYPE))

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.perm": self.perm.clone(), f"{name}.scale": self.scale.clone()}  # a group shares A

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., self.perm] * self.scale.to(x.dtype)

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        x = torch.empty_like(y)
        x[..., self.perm] = y / self.scale.to(y.dtype)
        return x

    @staticmethod
    def concat(parts: list["Monomial"]) -> "Monomial":
        """The block-diagonal monomial of `parts` side by side (a group's outputs, each with its own B)."""
        offsets = [0]
        for m in parts[:-1]:
            offsets.append(offsets[-1] + len(m.perm))
        return Monomial(torch.cat([m.perm + o for m, o in zip(parts, offsets)]), torch.cat([m.scale for m in parts]))


def masked_weight(weight: torch.Tensor, a: Monomial | None, b: Monomial | None) -> torch.Tensor:
    """`B W A^-1` for W [out, in], in float64: the map the worker holds, so `W' (A x) = B (W x)`."""
    w = weight.to(OFFLOAD_DTYPE)
    if a is not None:
        w = w[:, a.perm] / a.scale[None, :]
    if b is not None:
        w = w[b.perm] * b.scale[:, None]
    return w
