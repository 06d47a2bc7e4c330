"""Per-architecture protection rules, as data: which tensor gets which transform on which axis, and who gets it.

A rule matches tensor names by regex (the named group `layer` selects the per-layer key) and lists, for each axis,
the activation space it is indexed by and its role: "out" if the tensor produces (or is) a vector of that space, "in"
if it consumes one. `STIP.md` section 2 is the source of these tables. A tensor that no rule matches stops the
protection with an error: nothing is ever passed to the server unprotected by accident.

Spaces: "resid" (p), "vocab" (pc), and per layer "attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv" (GPT-2's fused
Q|K|V output), "ffn".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from stip.common.keys import Geometry
from stip.errors import UnsupportedModelError

SERVER, CLIENT, DROP = "server", "client", "drop"


@dataclass(frozen=True)
class TensorRule:
    pattern: str
    axes: dict[int, tuple[str, str]] = field(default_factory=dict)  # axis -> (space, role)
    party: str = SERVER  # SERVER, CLIENT (the embedding module), or DROP (buffers that are rebuilt on load)
    client_name: str | None = None  # name in the client's embedding file

    def match(self, name: str) -> re.Match | None:
        return re.fullmatch(self.pattern, name)


@dataclass(frozen=True)
class Architecture:
    model_types: tuple[str, ...]
    rules: tuple[TensorRule, ...]
    lm_head: str  # server name of the LM head
    tied_source: str  # the embedding tensor the LM head is tied to, when the checkpoint ties them
    zeroed_on_server: tuple[str, ...] = ()  # client-side tensors the server model still adds: give it zeros
    rope: bool = True  # RoPE: Q/K get quarter-turn pair rotations instead of in-head permutations

    def rule_for(self, name: str) -> tuple[TensorRule, int | None]:
        for rule in self.rules:
            m = rule.match(name)
            if m:
                layer = m.groupdict().get("layer")
                return rule, None if layer is None else int(layer)
        raise UnsupportedModelError(f"tensor {name!r} has no protection rule for {self.model_types[0]} models; "
                                    "refusing to pass it to the server unprotected")


def _linear(space_out: str, space_in: str) -> dict[int, tuple[str, str]]:
    """nn.Linear weight, stored [out, in]."""
    return {0: (space_out, "out"), 1: (space_in, "in")}


def _conv1d(space_out: str, space_in: str) -> dict[int, tuple[str, str]]:
    """GPT-2's Conv1D weight, stored [in, out]."""
    return {0: (space_in, "in"), 1: (space_out, "out")}


def _vec(space: str) -> dict[int, tuple[str, str]]:
    return {0: (space, "out")}


_L = r"model\.layers\.(?P<layer>\d+)\."

LLAMA = Architecture(
    model_types=("llama", "mistral", "qwen2"),
    rules=(
        TensorRule(r"model\.embed_tokens\.weight", {1: ("resid", "out")}, CLIENT, "token"),
        TensorRule(_L + r"self_attn\.q_proj\.weight", _linear("attn_q", "resid")),
        TensorRule(_L + r"self_attn\.k_proj\.weight", _linear("attn_k", "resid")),
        TensorRule(_L + r"self_attn\.v_proj\.weight", _linear("attn_v", "resid")),
        TensorRule(_L + r"self_attn\.q_proj\.bias", _vec("attn_q")),
        TensorRule(_L + r"self_attn\.k_proj\.bias", _vec("attn_k")),
        TensorRule(_L + r"self_attn\.v_proj\.bias", _vec("attn_v")),
        TensorRule(_L + r"self_attn\.o_proj\.weight", _linear("resid", "attn_o")),
        TensorRule(_L + r"self_attn\.o_proj\.bias", _vec("resid")),
        TensorRule(_L + r"mlp\.(gate|up)_proj\.weight", _linear("ffn", "resid")),
        TensorRule(_L + r"mlp\.(gate|up)_proj\.bias", _vec("ffn")),
        TensorRule(_L + r"mlp\.down_proj\.weight", _linear("resid", "ffn")),
        TensorRule(_L + r"mlp\.down_proj\.bias", _vec("resid")),
        TensorRule(_L + r"(input|post_attention)_layernorm\.weight", _vec("resid")),
        TensorRule(r"model\.norm\.weight", _vec("resid")),
        TensorRule(r"lm_head\.weight", _linear("vocab", "resid")),
        TensorRule(_L + r"self_attn\.rotary_emb\.inv_freq", party=DROP),
    ),
    lm_head="lm_head.weight",
    tied_source="model.embed_tokens.weight",
)

_H = r"(?:transformer\.)?h\.(?P<layer>\d+)\."

GPT2 = Architecture(
    model_types=("gpt2",),
    rules=(
        TensorRule(r"(?:transformer\.)?wte\.weight", {1: ("resid", "out")}, CLIENT, "token"),
        TensorRule(r"(?:transformer\.)?wpe\.weight", {1: ("resid", "out")}, CLIENT, "position"),
        TensorRule(_H + r"ln_[12]\.(weight|bias)", _vec("resid")),
        TensorRule(_H + r"attn\.c_attn\.weight", _conv1d("attn_qkv", "resid")),
        TensorRule(_H + r"attn\.c_attn\.bias", _vec("attn_qkv")),
        TensorRule(_H + r"attn\.c_proj\.weight", _conv1d("resid", "attn_o")),
        TensorRule(_H + r"attn\.c_proj\.bias", _vec("resid")),
        TensorRule(_H + r"mlp\.c_fc\.weight", _conv1d("ffn", "resid")),
        TensorRule(_H + r"mlp\.c_fc\.bias", _vec("ffn")),
        TensorRule(_H + r"mlp\.c_proj\.weight", _conv1d("resid", "ffn")),
        TensorRule(_H + r"mlp\.c_proj\.bias", _vec("resid")),
        TensorRule(r"(?:transformer\.)?ln_f\.(weight|bias)", _vec("resid")),
        TensorRule(r"lm_head\.weight", _linear("vocab", "resid")),
        TensorRule(_H + r"attn\.(masked_)?bias", party=DROP),
    ),
    lm_head="lm_head.weight",
    tied_source="transformer.wte.weight",
    zeroed_on_server=("transformer.wpe.weight",),
    rope=False,
)

ARCHITECTURES = (LLAMA, GPT2)
SUPPORTED = tuple(t for a in ARCHITECTURES for t in a.model_types)


def architecture_for(config) -> Architecture:
    model_type = getattr(config, "model_type", None)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported; supported model types: {', '.join(SUPPORTED)}")


def geometry_of(config) -> Geometry:
    """Read the shapes a key must match from a transformers config, refusing layouts the rules do not cover."""
    arch = architecture_for(config)
    if arch is GPT2:
        heads = config.n_head
        return Geometry(hidden=config.n_embd, vocab=config.vocab_size, layers=config.n_layer, heads=heads,
                        kv_heads=heads, head_dim=config.n_embd // heads,
                        ffn=config.n_inner or 4 * config.n_embd, rope=arch.rope)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings are not supported yet")
    if heads % kv:
        raise UnsupportedModelError(f"{heads} query heads do not split into {kv} KV groups")
    return Geometry(hidden=config.hidden_size, vocab=config.vocab_size, layers=config.num_hidden_layers,
                    heads=heads, kv_heads=kv, head_dim=head_dim, ffn=config.intermediate_size, rope=arch.rope)
