"""The shape of a protection rule table, as data: which tensor gets which transform on which axis, and who gets it.

A rule matches tensor names by regex (the named group `layer` selects the per-layer key) and lists, for each axis,
the activation space it is indexed by and its role: "out" if the tensor produces (or is) a vector of that space, "in"
if it consumes one. The rules follow the STIP paper (Yuan et al., NDSS 2026), plus what it does not cover: RoPE,
grouped-query attention and tied embeddings (see the rules below). A tensor that no rule matches stops the
protection with an error: nothing is ever passed to the server unprotected by accident.

Spaces: "resid" (p), "vocab" (pc), and per layer "attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv" (GPT-2's fused
Q|K|V output), "ffn", "ffn_up" (a SwiGLU's up projection and the down projection's input: "ffn", plus --harden ffn's
power-of-two scalings, which the gate must not get), "ffn_gate_up" (Phi-3's fused gate|up output:
the FFN permutation on both halves), "attn_qk_head" (the dims of one Q/K head, for a Q/K norm weight shared by all
heads), "expert" (an MoE router's outputs).

Experts: a named group `expert` in a rule's pattern marks one MoE expert's tensor. Its "ffn" axes then take that
expert's own FFN permutation (the ORIGINAL index, read from the name), and the tensor is written under the expert's
slot in the layer's secret expert order: original expert e goes to slot k where `experts.perm[k] == e`, so the
output name carries k (`Placement.name_in_slot`).

Naming: checkpoints name the tensors inside the base model with or without its prefix (hub `gpt2` has `h.0.…` where
`GPT2LMHeadModel` has `transformer.h.0.…`; a `model.`-less LLaMA has `layers.0.…`). Rules therefore match the name
inside the base model, the prefix optional, and every tensor is written under its canonical name (the model class's
own state-dict key). The tensors with a part in the scheme (the token embedding, the LM head, tables the server gets
as zeros) are found by their rule's `role` and flags, never by comparing names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from stip.common.keys import Geometry
from stip.common.tasks import TEXT_GENERATION
from stip.errors import UnsupportedModelError

SERVER, CLIENT, DROP = "server", "client", "drop"
TOKEN_EMBEDDING, LM_HEAD = "token_embedding", "lm_head"  # roles: the LM head is tied to the token embedding


@dataclass(frozen=True)
class TensorRule:
    pattern: str  # regex over the name inside the base model (prefix stripped), or the full name if not `in_base`
    axes: dict[int, tuple[str, str]] = field(default_factory=dict)  # axis -> (space, role)
    party: str = SERVER  # SERVER, CLIENT (the embedding module), or DROP (buffers that are rebuilt on load)
    client_name: str | None = None  # name in the client's embedding file ("token", "position")
    client_module: str | None = None  # or: a tensor of a client-side module (BERT's embeddings, LLaVA's vision
    # tower): it goes to the client's module shards, named by its name inside the base model minus this prefix
    role: str | None = None  # TOKEN_EMBEDDING or LM_HEAD: the pair a tied checkpoint stores once
    zeroed_on_server: bool = False  # a client tensor the server model still adds: the server gets zeros
    in_base: bool = True  # lives inside the base model (its prefix is optional in checkpoints); False: the LM head
    name: str | None = None  # the literal name, for a rule of one tensor (a tied LM head is written under it)
    copies: tuple[str, ...] = ()  # full names the server class also holds this tensor under, untied (BERT's MLM
    # decoder bias, which checkpoints store once as `cls.predictions.bias`)


def one(name: str, axes: dict[int, tuple[str, str]], **kw) -> TensorRule:
    """A rule for exactly one tensor, named literally."""
    return TensorRule(re.escape(name), axes, name=name, **kw)


@dataclass(frozen=True)
class NormFold:
    """A norm whose weight (and LayerNorm bias) --harden mix folds into the linears that read its output, so the
    server's copy is a weight of ones (and a bias of zeros). Names are canonical (the server bundle's), without
    ".weight"; `{layer}` stands for each layer index. `keep_bias`: the consumers have no bias to take the LayerNorm's
    (GPT-2's LM head), so the norm keeps `beta / gamma`, mixed like any residual vector."""

    norm: str
    consumers: tuple[str, ...]
    keep_bias: bool = False


@dataclass(frozen=True)
class RuleMatch:
    rule: TensorRule
    layer: int | None  # selects the per-layer key
    canonical: str  # the name the model class uses: what the server checkpoint holds
    expert: int | None = None  # an MoE expert's original index (the pattern's `expert` group)
    expert_at: tuple[int, int] | None = None  # where that index sits in `canonical`


@dataclass(frozen=True)
class Placement:
    """One output of one checkpoint tensor: where it goes, under which name, and how it is made."""

    party: str  # SERVER or CLIENT
    name: str  # canonical server name, or the client's embedding name
    rule: TensorRule  # whose axes transform it (a tied LM head: the LM head's rule)
    layer: int | None
    zeros: bool = False  # the server's zeroed copy of a client tensor
    expert: int | None = None  # an MoE expert's original index: selects its FFN permutation and output slot
    expert_at: tuple[int, int] | None = None  # where that index sits in `name`

    def name_in_slot(self, slot: int) -> str:
        """The output name with the expert's original index replaced by its slot in the secret expert order."""
        start, end = self.expert_at
        return f"{self.name[:start]}{slot}{self.name[end:]}"


def decoder_task(config) -> str:
    return TEXT_GENERATION


@dataclass(frozen=True)
class Architecture:
    """One family: the model types it covers, its rule table, and how to read its key's shapes and its task from a
    transformers config. Each family's table is its own module in this package."""

    model_types: tuple[str, ...]
    base_prefix: str  # "model." / "transformer.": the base model's prefix, which checkpoints may leave out
    rules: tuple[TensorRule, ...]
    geometry: Callable[[Any], Geometry]  # config -> the shapes a key must match (refuses layouts the rules miss)
    rope: bool = True  # RoPE: Q/K get quarter-turn pair rotations instead of in-head permutations
    task: Callable[[Any], str] = decoder_task  # config -> the Hugging Face pipeline task (stip.common.tasks)
    # config -> the table for the class the config names, where it differs by class (a prefix-less BertModel vs
    # BertForMaskedLM's `bert.`); None: this table serves every config of the family
    variant: Callable[[Any], "Architecture"] | None = None
    # config -> the transformers class the server bundle is loaded as; None: the family's ...ForCausalLM
    server_class: Callable[[Any], str] | None = None
    # config -> the factor the model's own embedding module multiplies token embeddings by (Gemma: sqrt(hidden)); the
    # server runs from embeddings, so the client applies it (stip_client.json "embedding_scale")
    embedding_scale: Callable[[Any], float] | None = None
    # (regex, replacement) over the name inside the base model, applied in order before matching: checkpoint names
    # the model class renames on load (transformers' conversion mapping, e.g. ViT's `encoder.layer.N.` ->
    # `layers.N.`), so that rules and the server bundle use the class's own names
    renames: tuple[tuple[str, str], ...] = ()
    # the server bundle keeps the names `save_pretrained` writes where the class's own differ (Mixtral's per-expert
    # tensors, which the class fuses on load): the completeness check (common.bundles.completeness) expects those
    saved_names: bool = False
    # config -> the config of the model the server runs, where that is not the whole model (LLaVA: its language
    # model's text config); None: the model's own config
    server_config: Callable[[Any], Any] | None = None
    # hardened modes (docs/hardened.md): the `stip protect --harden` options this family supports (others are
    # refused by name), and for "mix" which norm feeds which linears
    harden: tuple[str, ...] = ()
    norm_folds: tuple[NormFold, ...] = ()
    layer_norm: bool = False  # LayerNorm (subtracts the mean): the residual mixing must keep the all-ones direction

    def for_config(self, config) -> "Architecture":
        """The table for this config's model class (see `variant`)."""
        return self if self.variant is None else self.variant(config)

    def match(self, name: str) -> RuleMatch:
        """The rule for checkpoint tensor `name`, and its canonical name; refuses a tensor no rule covers."""
        inner = name.removeprefix(self.base_prefix)
        for pattern, replacement in self.renames:
            inner = re.sub(pattern, replacement, inner)
        for rule in self.rules:
            local = inner if rule.in_base else name
            m = re.fullmatch(rule.pattern, local)
            if m:
                groups = m.groupdict()
                prefix = self.base_prefix if rule.in_base else ""
                expert = groups.get("expert")
                at = None if expert is None else tuple(len(prefix) + i for i in m.span("expert"))
                # a rule outside the base model with a literal `name` writes under that name (LLaVA's LM head,
                # saved as `language_model.lm_head.weight` by older transformers)
                canonical = rule.name if rule.name and not rule.in_base else prefix + local
                return RuleMatch(rule, None if groups.get("layer") is None else int(groups["layer"]), canonical,
                                 None if expert is None else int(expert), at)
        raise UnsupportedModelError(f"tensor {name!r} has no protection rule for {self.model_types[0]} models; "
                                    "refusing to pass it to the server unprotected")

    def with_role(self, role: str) -> TensorRule:
        return next(r for r in self.rules if r.role == role)

    def placements(self, name: str, tied: bool) -> list[Placement]:
        """Where checkpoint tensor `name` goes. Client tensors go to the client unchanged (it applies `p` on load);
        a tied token embedding also makes the server's LM head; a zeroed table also goes to the server as zeros;
        a tied checkpoint's own copy of the LM head is skipped (it is the embedding)."""
        m = self.match(name)
        rule = m.rule
        if rule.party == DROP or (tied and rule.role == LM_HEAD):
            return []
        if rule.party == SERVER:
            return [Placement(SERVER, m.canonical, rule, m.layer, expert=m.expert, expert_at=m.expert_at),
                    *(Placement(SERVER, c, rule, m.layer) for c in rule.copies)]
        if rule.client_module is not None:
            local = m.canonical.removeprefix(self.base_prefix) if rule.in_base else m.canonical
            out = [Placement(CLIENT, local.removeprefix(rule.client_module), rule, None)]
        else:
            out = [Placement(CLIENT, rule.client_name, rule, None)]
        if tied and rule.role == TOKEN_EMBEDDING:
            head = self.with_role(LM_HEAD)
            out.append(Placement(SERVER, head.name, head, None))
        if rule.zeroed_on_server:
            out.append(Placement(SERVER, m.canonical, rule, None, zeros=True))
        return out


def linear(space_out: str, space_in: str) -> dict[int, tuple[str, str]]:
    """nn.Linear weight, stored [out, in]."""
    return {0: (space_out, "out"), 1: (space_in, "in")}


def conv1d(space_out: str, space_in: str) -> dict[int, tuple[str, str]]:
    """GPT-2's Conv1D weight, stored [in, out]."""
    return {0: (space_in, "in"), 1: (space_out, "out")}


def vec(space: str) -> dict[int, tuple[str, str]]:
    return {0: (space, "out")}


LM_HEAD_RULE = one("lm_head.weight", linear("vocab", "resid"), role=LM_HEAD, in_base=False)


def attention_geometry(config, *, ffn: int | None = None, rope: bool = True, **extra) -> Geometry:
    """The key shapes of a LLaMA-style config (hidden_size, num_attention_heads, num_key_value_heads, head_dim,
    intermediate_size), refusing layouts the rules do not cover. `extra`: Geometry's optional fields (labels,
    experts)."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if rope:
        params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        if float(factor if factor is not None else 1.0) != 1.0:
            raise UnsupportedModelError("partial rotary embeddings are not supported yet")
    if heads % kv:
        raise UnsupportedModelError(f"{heads} query heads do not split into {kv} KV groups")
    return Geometry(hidden=config.hidden_size, vocab=config.vocab_size, layers=config.num_hidden_layers,
                    heads=heads, kv_heads=kv, head_dim=head_dim,
                    ffn=config.intermediate_size if ffn is None else ffn, rope=rope, **extra)
