"""--harden mix: fold every norm's weight (and LayerNorm's bias) into the linears that read its output.

Dense mixing `Q` of the residual stream commutes with a weight-less norm (RMSNorm: `rms(x Q) = rms(x)`; LayerNorm:
also `mean`, when `Q` keeps the all-ones direction) but not with an elementwise weight. So the norm's weight `w` moves
into each consumer, `W diag(w)` (before `Q` is applied), and the server's norm is a weight of ones; LayerNorm's bias
`beta` moves into the consumer's bias, `b + W beta`. Which norm feeds which linears is data per family
(`Architecture.norm_folds`). All folding is done in float64 on plain weights, before the transforms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from stip.common.architectures import Architecture
from stip.common.architectures.rules import NormFold, TensorRule
from stip.errors import TensorSetError, UnsupportedModelError

NORM, LINEAR = "norm", "linear"


def _resid_in_axis(rule: TensorRule, name: str) -> int:
    axes = [a for a, (space, role) in rule.axes.items() if space == "resid" and role == "in"]
    if len(axes) != 1:
        raise UnsupportedModelError(f"{name}: a norm's consumer must read the residual stream on one axis")
    return axes[0]


@dataclass
class NormFolder:
    """The plain norm vectors, which consumer reads which norm, and the bias each LayerNorm adds to its consumers."""

    folds: dict[str, NormFold]  # norm canonical name (layer filled in) -> its fold
    consumer_of: dict[str, str]  # consumer canonical name (no ".weight") -> norm canonical name
    norms: dict[str, torch.Tensor]  # "<norm>.weight" / "<norm>.bias" -> plain float64 tensor
    bias_delta: dict[str, torch.Tensor]  # "<consumer>.bias" -> W beta (float64), added to the consumer's bias

    @classmethod
    def build(cls, arch: Architecture, layers: int, names: Iterable[str],
              read: Callable[[set[str]], dict[str, torch.Tensor]]) -> "NormFolder":
        """`names`: the checkpoint's tensor names; `read`: random access to some of them."""
        folds, consumer_of = {}, {}
        for fold in arch.norm_folds:
            for i in (range(layers) if "{layer}" in fold.norm else [None]):
                norm = fold.norm.format(layer=i)
                folds[norm] = fold
                consumer_of |= {c.format(layer=i): norm for c in fold.consumers}
        to_ck = {arch.match(n).canonical: n for n in names}  # canonical name -> checkpoint name
        wanted = {f"{n}.{part}" for n in folds for part in ("weight", "bias")}
        plain = read({to_ck[c] for c in wanted if c in to_ck})
        norms = {c: plain[to_ck[c]].double() for c in wanted if c in to_ck}
        missing = [f"{n}.weight" for n in folds if f"{n}.weight" not in norms]
        if missing:
            raise TensorSetError(f"--harden mix: norm weight {missing[0]!r} is not in the checkpoint")
        bias_delta: dict[str, torch.Tensor] = {}
        consumers = {c: n for c, n in consumer_of.items() if f"{n}.bias" in norms and not folds[n].keep_bias}
        weights = read({to_ck[f"{c}.weight"] for c in consumers if f"{c}.weight" in to_ck})
        for c, norm in consumers.items():
            if f"{c}.bias" not in to_ck:
                raise UnsupportedModelError(f"--harden mix: {c} has no bias to take {norm}'s bias")
            w = weights[to_ck[f"{c}.weight"]].double()
            axis = _resid_in_axis(arch.match(to_ck[f"{c}.weight"]).rule, c)
            bias_delta[f"{c}.bias"] = torch.tensordot(w, norms[f"{norm}.bias"], dims=([axis], [0]))
        return cls(folds, consumer_of, norms, bias_delta)

    def fold(self, name: str, rule: TensorRule, t: torch.Tensor) -> tuple[str, torch.Tensor]:
        """(kind, tensor) for server tensor `name` (canonical) with plain value `t` (float64). kind NORM: the final
        tensor (ones, zeros; a kept bias still gets the rule's transform: LINEAR is returned for it); LINEAR: the
        folded plain tensor, to be transformed as usual."""
        base, _, part = name.rpartition(".")
        if base in self.folds:
            if part == "weight":
                return NORM, torch.ones_like(t)
            if not self.folds[base].keep_bias:
                return NORM, torch.zeros_like(t)
            gamma = self.norms[f"{base}.weight"]
            if bool(((gamma == 0) & (t != 0)).any()):
                raise UnsupportedModelError(f"--harden mix: {base} has a zero weight under a non-zero bias")
            return LINEAR, torch.where(gamma == 0, torch.zeros_like(t), t / gamma)
        norm = self.consumer_of.get(base)
        if norm is None:
            return LINEAR, t
        if part == "weight":
            axis = _resid_in_axis(rule, name)
            shape = [1] * t.dim()
            shape[axis] = -1
            return LINEAR, t * self.norms[f"{norm}.weight"].view(shape)
        return LINEAR, t + self.bias_delta.get(name, 0)
