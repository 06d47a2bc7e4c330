"""`stip protect --harden aloepri --aloepri KEY=VALUE,...`: the knobs of AloePri's covariant obfuscation
(docs/aloepri.md), their published defaults, and the checks that refuse a bad value before anything is read."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from stip.developer.harden_options import HardenOptionError

ALOEPRI = "aloepri"  # the --harden value that selects this scheme


@dataclass(frozen=True)
class AloepriOptions:
    """The published defaults (Lin et al., arXiv 2603.01499, section 6.1): lambda 0.3, h 128, alpha_e 1.0,
    alpha_h 0.2, beta 8, gamma 1e3. `scale` (our choice; the paper does not give one) bounds the paired Q/K and the
    FFN scalings: each is drawn log-uniformly in [1/scale, scale]."""

    h: int = 128  # expansion: the residual stream widens from d to d + 2h
    lam: float = 0.3  # B = U + lambda V: how far the key matrix is from orthogonal
    alpha_e: float = 1.0  # embedding noise, relative to the embedding table's std
    alpha_h: float = 0.2  # LM-head noise, relative to the (norm-folded) head's std
    beta: int = 8  # largest window of RoPE blocks shuffled together (1: no shuffle)
    gamma: float = 1e3  # window sampling: softmax(gamma * frequency gap) picks each window's size
    scale: float = 2.0  # Q/K pair and FFN neuron scalings in [1/scale, scale] (1: none)
    calibration_tokens: int = 256  # tokens the per-norm kappa is estimated on

    def as_dict(self) -> dict:
        """The options as written into the manifests (`"aloepri"`), under the names the CLI takes."""
        return {_CLI_NAME.get(k, k): v for k, v in asdict(self).items()}

    @property
    def exact(self) -> bool:
        """Whether the transform is exact up to rounding: no noise, an orthogonal key, no expansion, no RoPE-block
        shuffle (then kappa is exactly 1; see docs/aloepri.md)."""
        return self.h == 0 and self.lam == 0 and self.alpha_e == 0 and self.alpha_h == 0 and self.beta <= 1


_CLI_NAME = {"lam": "lambda"}  # field -> the name in KEY=VALUE text (lambda is a Python keyword)
_FIELD = {v: k for k, v in _CLI_NAME.items()}


def fitted_h(h: int, hidden: int, heads: int) -> int:
    """The expansion actually used: the smallest h' >= h with (hidden + 2 h') a multiple of the number of heads,
    because transformers' LlamaConfig refuses a hidden size that is not (SmolLM2: d = 576, 9 heads, h 128 -> 135).
    h = 0 stays 0."""
    while h and (hidden + 2 * h) % heads:
        h += 1
    return h


def parse_aloepri(text: str | dict | AloepriOptions | None) -> AloepriOptions:
    """Options from "h=128,lambda=0.3,..." (or a dict of the same names, or options); unnamed knobs keep their
    defaults. Refuses unknown names and out-of-range values, naming them."""
    if isinstance(text, AloepriOptions):
        return check_aloepri(text)
    items = dict(text or {}) if not isinstance(text, str) else _pairs(text)
    known = {f.name: f for f in fields(AloepriOptions)}
    values = {}
    for name, raw in items.items():
        field = _FIELD.get(name, name)
        if field not in known or name in _CLI_NAME:
            raise HardenOptionError(f"unknown --aloepri option {name!r}; choose from "
                                    f"{', '.join(_CLI_NAME.get(n, n) for n in known)}")
        kind = int if known[field].type in (int, "int") else float
        try:
            values[field] = kind(raw) if kind is float or not isinstance(raw, float) else int(raw)
        except (TypeError, ValueError):
            raise HardenOptionError(f"--aloepri {name}={raw!r}: not a number") from None
    return check_aloepri(replace(AloepriOptions(), **values))


def _pairs(text: str) -> dict[str, str]:
    out = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep:
            raise HardenOptionError(f"--aloepri takes KEY=VALUE pairs separated by commas; got {part!r}")
        out[name.strip()] = value.strip()
    return out


def check_aloepri(o: AloepriOptions) -> AloepriOptions:
    """Refuse values the construction cannot take (NaN fails every comparison, so it is refused too)."""
    bad = []
    if not (isinstance(o.h, int) and 0 <= o.h <= 65536):
        bad.append(f"h={o.h!r} (an integer >= 0)")
    for name in ("lam", "alpha_e", "alpha_h"):
        v = getattr(o, name)
        if not (math.isfinite(v) and 0 <= v <= 10):
            bad.append(f"{_CLI_NAME.get(name, name)}={v!r} (a number in [0, 10])")
    if not (isinstance(o.beta, int) and o.beta >= 1):
        bad.append(f"beta={o.beta!r} (an integer >= 1)")
    if not (math.isfinite(o.gamma) and o.gamma >= 0):
        bad.append(f"gamma={o.gamma!r} (a number >= 0)")
    if not (math.isfinite(o.scale) and 1 <= o.scale <= 16):
        bad.append(f"scale={o.scale!r} (a number in [1, 16])")
    if not (isinstance(o.calibration_tokens, int) and o.calibration_tokens >= 8):
        bad.append(f"calibration_tokens={o.calibration_tokens!r} (an integer >= 8)")
    if bad:
        raise HardenOptionError(f"bad --aloepri value: {'; '.join(bad)}")
    return o
