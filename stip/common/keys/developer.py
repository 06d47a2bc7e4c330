"""The developer key: the client key plus every layer's key, drawn fresh for a model, looked up by activation space,
and kept in the developer's key file (which also records the model's geometry)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from stip.common.keys.client import ClientKey
from stip.common.keys.draws import HARDEN_OPTIONS, MAX_DRAWS, distinct, draw_nontrivial
from stip.common.keys.file_format import fingerprint, read_key_file, write_key_file
from stip.common.keys.geometry import Geometry
from stip.common.keys.layer import LayerKey
from stip.common.transforms import BlockDiagonal, Dense, KeyRng, SignedPermutation, orthogonal_keeping_ones
from stip.errors import KeyMismatchError


@dataclass
class DeveloperKey:
    """The whole secret: the client key plus every layer's part. Stays with the model developer."""

    geometry: Geometry
    client: ClientKey
    layers: list[LayerKey]

    @classmethod
    def generate(cls, g: Geometry, bundle_id: str, rng: KeyRng | None = None, harden: tuple[str, ...] = (),
                 keep_ones: bool = False) -> "DeveloperKey":
        """Draw a fresh key. Redraw any part that came out as the identity or repeats an earlier layer, so that
        every layer is protected and no layer's transforms reveal another's. `harden`: options of HARDEN_OPTIONS,
        drawn after the paper's parts; `keep_ones`: with "mix", `Q` keeps the all-ones direction (LayerNorm)."""
        unknown = set(harden) - set(HARDEN_OPTIONS)
        if unknown:
            raise ValueError(f"unknown hardening option(s) {sorted(unknown)}; choose from {', '.join(HARDEN_OPTIONS)}")
        rng = rng or KeyRng()
        client = ClientKey(bundle_id, draw_nontrivial(rng, g.hidden), draw_nontrivial(rng, g.vocab),
                           draw_nontrivial(rng, g.labels) if g.labels else None)
        layers = _draw_distinct_layers(g, rng)
        if "mix" in harden:
            client.resid = Dense(orthogonal_keeping_ones(rng, g.hidden) if keep_ones else rng.orthogonal(g.hidden))
        for layer in layers:
            layer.harden(g, rng, frozenset(harden))
        return cls(g, client, layers)

    @property
    def harden(self) -> tuple[str, ...]:
        """The hardening options this key was drawn with, in HARDEN_OPTIONS order."""
        parts = {"mix": self.client.mixed, "rope": any(x.qk_mix is not None for x in self.layers),
                 "vo": any(x.vo_mix is not None for x in self.layers),
                 "ffn": any(x.ffn_scale is not None for x in self.layers)}
        return tuple(o for o in HARDEN_OPTIONS if parts[o])

    def space(self, name: str, layer: int | None, expert: int | None = None) -> SignedPermutation:
        """The transform of activation space `name` ("resid", "vocab", "label", or a per-layer space); `expert`
        (an original expert index) selects an MoE expert's own "ffn" space."""
        if name == "resid":
            return self.client.resid
        if name == "vocab":
            return self.client.vocab
        if name == "label":
            if self.client.labels is None:
                raise ValueError("this key has no label permutation (the model has no classifier head)")
            return self.client.labels
        if layer is None or not 0 <= layer < len(self.layers):
            raise ValueError(f"space {name!r} needs a layer index in [0, {len(self.layers)})")
        if expert is not None:
            if name != "ffn" or self.layers[layer].expert_ffn is None:
                raise ValueError(f"space {name!r} of layer {layer} has no per-expert transform")
            return self.layers[layer].expert_ffn[expert]
        lk = self.layers[layer]
        if not lk.is_hardened:
            return lk.spaces(self.geometry)[name]
        cache = self.__dict__.setdefault("_hardened_spaces", {})  # built once per (space, layer): inverses too
        if (name, layer) not in cache:
            if name == "attn_qkv":  # GPT-2's fused Q|K|V output: each part hardened
                cache[name, layer] = BlockDiagonal(tuple(self.space(p, layer) for p in ("attn_q", "attn_k", "attn_v")))
            else:
                cache[name, layer] = lk.hardened(self.geometry, name, lk.spaces(self.geometry)[name])
        return cache[name, layer]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = self.client.tensors()
        for i, layer in enumerate(self.layers):
            out |= layer.tensors(i)
        return out

    @property
    def fingerprint(self) -> str:
        return fingerprint("developer", self.client.bundle_id, self.tensors())

    def save(self, path: Path) -> str:
        return write_key_file(path, "developer", self.client.bundle_id, self.tensors(),
                              {"geometry": json.dumps(asdict(self.geometry))})

    @classmethod
    def load(cls, path: Path) -> "DeveloperKey":
        meta, t = read_key_file(path, "developer")
        if "geometry" not in meta:  # an AloePri key is a seed (stip/developer/aloepri.py), not per-layer permutations
            raise KeyMismatchError(f"{path} is a {meta.get('scheme', 'non-permutation')} developer key (a seed, not "
                                   f"per-layer permutations); it cannot be reused or rotated: run `stip protect` "
                                   f"again for a fresh key")
        g = Geometry(**json.loads(meta["geometry"]))
        client = ClientKey.from_tensors(meta["bundle_id"], t)
        return cls(g, client, [LayerKey.from_tensors(t, i) for i in range(g.layers)])

    def check_matches(self, g: Geometry) -> None:
        if g != self.geometry:
            raise KeyMismatchError(f"the developer key was drawn for a model of shape {self.geometry}, "
                                   f"not for this model ({g})")


def _draw_distinct_layers(g: Geometry, rng: KeyRng) -> list[LayerKey]:
    """Every layer's key, each redrawn until none of its spaces is the identity or repeats an earlier layer's."""
    layers: list[LayerKey] = []
    seen: list[dict[str, SignedPermutation]] = []
    for _ in range(g.layers):
        for _attempt in range(MAX_DRAWS):
            layer = LayerKey.draw(g, rng)
            spaces = layer.spaces(g)
            if distinct(spaces, seen):
                break
        else:
            raise ValueError(f"model too small to draw {g.layers} distinct non-identity layer keys")
        layers.append(layer)
        seen.append(spaces)
    return layers
