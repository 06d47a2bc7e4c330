"""Protection keys: what they hold, how they are drawn, and their file format.

The key is split as in the paper. The client key (`p` for the residual stream, `pc` for the vocabulary) is all a data
owner ever receives. The developer key adds the per-layer part (head order, in-head Q/K transform, in-head V
permutation, FFN-neuron permutation) and never leaves the developer. Both are safetensors files with a format version,
a fingerprint over their contents, and the id of the bundle they protect, written atomically and owner-only.

Hardened modes (docs/hardened.md) add optional tensors: the client key's `resid.mix` (a dense orthogonal `Q` that
replaces `p`), and per layer `qk_mix` (in-head rotations of Q/K), `vo_mix` (in-head invertible mixing of V/O) and
`ffn_scale` (power-of-two exponents of the FFN's up projection). Keys without them load and fingerprint as before.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from stip.common.files import write_bytes_atomic
from stip.common.transforms import (BlockDiagonal, Chain, Dense, KeyRng, Scale, SignedPermutation,
                                    orthogonal_keeping_ones, pair_rotation_matrix, rope_pair_rotation)
from stip.errors import BundleError, KeyMismatchError

KEY_FORMAT = "stip-key"
KEY_VERSION = 1
_MAX_DRAWS = 64
HARDEN_OPTIONS = ("mix", "rope", "vo", "ffn")  # see docs/hardened.md


@dataclass(frozen=True)
class Geometry:
    """The shapes a key must match; read from the model config."""

    hidden: int
    vocab: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    rope: bool
    labels: int = 0  # classifier outputs (sequence or image classification): the client key's label permutation
    experts: int = 0  # MoE experts per layer: each layer's expert order and one FFN permutation per expert
    expert_ffn: int = 0  # the experts' FFN width where it differs from `ffn` (Qwen-MoE's moe_intermediate_size; `ffn`
    # is then its dense layers' or shared expert's width)
    qk_norm: bool = False  # Q/K normed over head dims by one weight for all heads (Qwen3, Gemma): every head's
    # in-head Q/K transform then moves dims the same way (signs may differ), and that weight is moved with it

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA); 1 for plain multi-head attention."""
        return self.heads // self.kv_heads


def _fingerprint(kind: str, bundle_id: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(f"{KEY_FORMAT}/{KEY_VERSION}/{kind}/{bundle_id}".encode())
    for name in sorted(tensors):
        h.update(name.encode() + b"\0" + tensors[name].contiguous().numpy().tobytes())
    d = h.hexdigest()[:32]
    return ":".join(d[i : i + 4] for i in range(0, 32, 4))


def _perm_tensors(prefix: str, t: SignedPermutation) -> dict[str, torch.Tensor]:
    out = {f"{prefix}.perm": t.perm}
    if t.sign is not None:
        out[f"{prefix}.sign"] = t.sign.to(torch.int8)
    return out


def _perm_from(tensors: dict[str, torch.Tensor], prefix: str) -> SignedPermutation:
    return SignedPermutation(tensors[f"{prefix}.perm"].to(torch.int64), tensors.get(f"{prefix}.sign"))


def _save_key(path: Path, kind: str, bundle_id: str, tensors: dict[str, torch.Tensor], extra: dict) -> str:
    fp = _fingerprint(kind, bundle_id, tensors)
    meta = {"format": KEY_FORMAT, "version": str(KEY_VERSION), "kind": kind, "bundle_id": bundle_id,
            "fingerprint": fp, **extra}
    write_bytes_atomic(Path(path), save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta), mode=0o600)
    return fp


def read_key_file(path: Path, kind: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Load and check a key file: format, version, kind, and that its contents match its fingerprint."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"key file {path} is missing")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{path} is not a STIP key file: {e}") from None
    if meta.get("format") != KEY_FORMAT:
        raise BundleError(f"{path} is not a STIP key file")
    if meta.get("version") != str(KEY_VERSION):
        raise BundleError(f"{path} has key format version {meta.get('version')}, this STIP reads {KEY_VERSION}")
    if meta.get("kind") != kind:
        raise BundleError(f"{path} is a {meta.get('kind')} key, expected a {kind} key")
    if _fingerprint(kind, meta.get("bundle_id", ""), tensors) != meta.get("fingerprint"):
        raise BundleError(f"{path} is corrupt or was modified: its contents do not match its fingerprint")
    return meta, tensors


@dataclass
class ClientKey:
    """`p` (residual stream), `pc` (vocabulary) and, for classifiers, `pl` (labels): what the data owner needs to
    talk to the protected model. A classifier's outputs are permuted by `pl` as an LM head's are by `pc`."""

    bundle_id: str
    resid: SignedPermutation | Dense  # `p`, or with --harden mix a dense orthogonal `Q`
    vocab: SignedPermutation
    labels: SignedPermutation | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {**_resid_tensors(self.resid), **_perm_tensors("vocab", self.vocab)}
        if self.labels is not None:
            out |= _perm_tensors("labels", self.labels)
        return out

    @property
    def fingerprint(self) -> str:
        return _fingerprint("client", self.bundle_id, self.tensors())

    def save(self, path: Path) -> str:
        return _save_key(path, "client", self.bundle_id, self.tensors(), {})

    @classmethod
    def load(cls, path: Path) -> "ClientKey":
        meta, t = read_key_file(path, "client")
        return cls(meta["bundle_id"], _resid_from(t), _perm_from(t, "vocab"), _labels_from(t))

    def residual_matrix(self) -> torch.Tensor:
        """The [d, d] float64 matrix R with: rows the client sends = embedding rows @ R (plus noise where the bundle
        adds it). The signed permutation matrix of `p`, or `Q` under --harden mix."""
        return self.resid.matrix()

    @property
    def mixed(self) -> bool:
        """Whether the residual stream is densely mixed (--harden mix) rather than permuted."""
        return isinstance(self.resid, Dense)

    def check_belongs_to(self, bundle_id: str, what: str) -> None:
        if self.bundle_id != bundle_id:
            raise KeyMismatchError(
                f"the client key (bundle {self.bundle_id}) does not belong to {what} (bundle {bundle_id})")


def _labels_from(t: dict[str, torch.Tensor]) -> SignedPermutation | None:
    return _perm_from(t, "labels") if "labels.perm" in t else None


def _resid_tensors(resid: SignedPermutation | Dense) -> dict[str, torch.Tensor]:
    return {"resid.mix": resid.m.double()} if isinstance(resid, Dense) else _perm_tensors("resid", resid)


def _resid_from(t: dict[str, torch.Tensor]) -> SignedPermutation | Dense:
    return Dense(t["resid.mix"].double()) if "resid.mix" in t else _perm_from(t, "resid")


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
        if "rope" in options:  # RoPE models: a random angle per pair; others (GPT-2): any orthogonal map per head
            if g.rope:
                angles = torch.from_numpy(rng.uniform(g.kv_heads * (g.head_dim // 2)) * 2 * torch.pi)
                self.qk_mix = torch.stack([pair_rotation_matrix(a, g.head_dim)
                                           for a in angles.view(g.kv_heads, g.head_dim // 2)])
            else:
                self.qk_mix = torch.stack([rng.orthogonal(g.head_dim) for _ in range(g.kv_heads)])
        if "vo" in options:  # orthogonal times exact power-of-two column scalings (2^-1..2^1): invertible, and
            # not norm-preserving
            self.vo_mix = torch.stack([rng.orthogonal(g.head_dim) * torch.pow(2.0, rng.integers(g.head_dim, 4)
                                                                              .clamp(max=2).double() - 1)[None, :]
                                       for _ in range(g.kv_heads)])
        if "ffn" in options:
            self.ffn_scale = (rng.integers(g.ffn, 8) - 4).to(torch.int8)  # k in [-4, 3]

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
        return any(t is not None for t in (self.qk_mix, self.vo_mix, self.ffn_scale))

    @classmethod
    def draw(cls, g: Geometry, rng: KeyRng) -> "LayerKey":
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
        return cls(
            kv_order=rng.permutation(g.kv_heads),
            q_order=torch.stack([rng.permutation(g.group) for _ in range(g.kv_heads)]),
            qk=qk,
            v=[SignedPermutation(rng.permutation(g.head_dim)) for _ in range(g.kv_heads)],
            ffn=SignedPermutation(rng.permutation(g.ffn)),
            experts=SignedPermutation(rng.permutation(g.experts)) if g.experts else None,
            expert_ffn=[SignedPermutation(rng.permutation(g.expert_ffn or g.ffn)) for _ in range(g.experts)]
            if g.experts else None,
        )

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
        out |= _stack_perms(f"layers.{i}.qk", self.qk)
        out |= _stack_perms(f"layers.{i}.v", self.v)
        out |= _perm_tensors(f"layers.{i}.ffn", self.ffn)
        if self.experts is not None:
            out |= _perm_tensors(f"layers.{i}.experts", self.experts)
            out |= _stack_perms(f"layers.{i}.expert_ffn", self.expert_ffn)
        for part in ("qk_mix", "vo_mix", "ffn_scale"):
            if getattr(self, part) is not None:
                out[f"layers.{i}.{part}"] = getattr(self, part)
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], i: int) -> "LayerKey":
        moe = f"layers.{i}.experts.perm" in t
        return cls(t[f"layers.{i}.kv_order"].long(), t[f"layers.{i}.q_order"].long(),
                   _unstack_perms(t, f"layers.{i}.qk"), _unstack_perms(t, f"layers.{i}.v"),
                   _perm_from(t, f"layers.{i}.ffn"),
                   _perm_from(t, f"layers.{i}.experts") if moe else None,
                   _unstack_perms(t, f"layers.{i}.expert_ffn") if moe else None,
                   *(t.get(f"layers.{i}.{part}") for part in ("qk_mix", "vo_mix", "ffn_scale")))


def _gather_heads(parts: list[tuple[SignedPermutation, int]]) -> SignedPermutation:
    """Output head k takes the source head starting at offset_k, transformed inside by its in-head transform."""
    perm = torch.cat([t.perm + offset for t, offset in parts])
    signs = [torch.ones(len(t), dtype=torch.int8) if t.sign is None else t.sign.to(torch.int8) for t, _ in parts]
    sign = torch.cat(signs)
    return SignedPermutation(perm, None if bool((sign > 0).all()) else sign)


def _stack_perms(prefix: str, perms: list[SignedPermutation]) -> dict[str, torch.Tensor]:
    out = {f"{prefix}.perm": torch.stack([p.perm for p in perms])}
    if any(p.sign is not None for p in perms):
        out[f"{prefix}.sign"] = torch.stack(
            [torch.ones(len(p), dtype=torch.int8) if p.sign is None else p.sign.to(torch.int8) for p in perms])
    return out


def _unstack_perms(t: dict[str, torch.Tensor], prefix: str) -> list[SignedPermutation]:
    perms, signs = t[f"{prefix}.perm"].long(), t.get(f"{prefix}.sign")
    return [SignedPermutation(perms[k], None if signs is None else signs[k]) for k in range(perms.shape[0])]


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
        client = ClientKey(bundle_id, _draw_nontrivial(rng, g.hidden), _draw_nontrivial(rng, g.vocab),
                           _draw_nontrivial(rng, g.labels) if g.labels else None)
        layers: list[LayerKey] = []
        seen: list[dict[str, SignedPermutation]] = []
        for _ in range(g.layers):
            for _attempt in range(_MAX_DRAWS):
                layer = LayerKey.draw(g, rng)
                spaces = layer.spaces(g)
                if _distinct(spaces, seen):
                    break
            else:
                raise ValueError(f"model too small to draw {g.layers} distinct non-identity layer keys")
            layers.append(layer)
            seen.append(spaces)
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
        return _fingerprint("developer", self.client.bundle_id, self.tensors())

    def save(self, path: Path) -> str:
        return _save_key(path, "developer", self.client.bundle_id, self.tensors(),
                         {"geometry": json.dumps(asdict(self.geometry))})

    @classmethod
    def load(cls, path: Path) -> "DeveloperKey":
        meta, t = read_key_file(path, "developer")
        g = Geometry(**json.loads(meta["geometry"]))
        client = ClientKey(meta["bundle_id"], _resid_from(t), _perm_from(t, "vocab"), _labels_from(t))
        return cls(g, client, [LayerKey.from_tensors(t, i) for i in range(g.layers)])

    def check_matches(self, g: Geometry) -> None:
        if g != self.geometry:
            raise KeyMismatchError(f"the developer key was drawn for a model of shape {self.geometry}, "
                                   f"not for this model ({g})")


def _draw_nontrivial(rng: KeyRng, n: int) -> SignedPermutation:
    for _ in range(_MAX_DRAWS):
        t = SignedPermutation(rng.permutation(n))
        if n < 2 or not t.is_identity():
            return t
    raise AssertionError("unreachable: CSPRNG returned the identity 64 times")


_DISTINCT_FROM = 8  # spaces this large have >= 8! transforms: every layer can get its own


def _distinct(spaces: dict[str, SignedPermutation], seen: list[dict[str, SignedPermutation]]) -> bool:
    """No space is the identity; no space of real size repeats an earlier layer's (tiny test spaces of 2-7 elements
    have too few permutations for that)."""
    for name, t in spaces.items():
        if len(t) > 1 and t.is_identity():
            return False
        if len(t) >= _DISTINCT_FROM and any(t.same_as(prev[name]) for prev in seen):
            return False
    return True
