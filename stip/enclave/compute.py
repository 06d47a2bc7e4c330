"""What the enclave computes in TEE mode: the embedding in `p`, block 0, the final norm, the LM head and `pc`.

The split (docs/tee.md, "The split"): in a pre-LN block a worker that computed the first attention output `a1` and
then received `h1 = x p + a1` would recover `x p = h1 - a1`. So block 0 runs here, as the model's own decoder-layer
module (a 1-layer model built from the config: RoPE, GQA and GPT-2's Conv1D work unchanged): its norms, attention
core, activations, residual adds and KV cache stay in the enclave. Only its linear maps go to the worker, each with a
fresh pad (Slalom): the enclave sends `A (x + r)`, the worker returns `W' A (x + r) + B b` with its copy
`W' = B W A^-1` (`stip protect --tee` stores block 0 in secret monomial bases `A`, `B`, so the worker's copy of
block 0 is not in the basis of `h1 p`); the enclave applies `B^-1` and subtracts `W r`. The worker runs blocks
1..L-1 on `h1 p` and returns the last hidden state; the final norm runs here. The LM head: a tied model's (its
embedding table) is computed here, an untied one is offloaded with a pad and an input mask `A`; `pc` is undone
here. The padded products are computed in float64 on both sides and the masks are signs times powers of two (exact
in floating point), so the result is `W x` to float64 accuracy and greedy generation equals plain generation.

Pads are drawn per call from a torch generator reseeded from `os.urandom` for every step. Production would draw the
pads and compute `W r` ahead of time, while the enclave is idle (Slalom), so a step costs the enclave one addition
and one subtraction per linear; here `W r` is computed on the spot.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

# Where the parts live in a transformers base model (`model.base_model`): rules as data, first match wins.
LAYERS_ATTRS = ("layers", "h")  # the decoder blocks
FINAL_NORM_ATTRS = ("norm", "ln_f")  # the norm after the last block
POSITION_ATTRS = ("wpe",)  # learned absolute positions, added inside the base model's forward (GPT-2)
LM_HEAD = "lm_head"  # the worker op name of the LM head
PAD_SCALE = 2.0**20  # pad entries ~ N(0, 1) x this x the RMS of the row they mask (docs/tee.md: averaging)
OFFLOAD_DTYPE = torch.float64  # the padded products, on both sides: exact to float32 after the subtraction
# Sibling linears the model applies to the same input tensor: one request, one pad, for the group (rules as data).
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
GROUP_SEP = "+"  # a grouped request names its linears joined by this; the worker returns their outputs side by side

# Tensor names of the enclave bundle (the sealed DIR/enclave/, written by `stip protect --tee`).
RESID, VOCAB = "resid", "vocab"  # the client key's p and pc: "<x>.perm", "<x>.sign" (optional)
TOKEN_EMBEDDING, POSITION_EMBEDDING, EMBEDDING_SCALE = "embed.token", "embed.position", "embed.scale"
BLOCK_PREFIX, FINAL_NORM_PREFIX, LM_HEAD_PREFIX = "block.", "final_norm.", "lm_head."
# The worker's secret bases (stip.developer.tee): "mask.<linear>.in.perm"/".in.scale" (A, one per input group),
# "mask.<linear>.out.perm"/".out.scale" (B); a tied model's LM head is computed here (this flag), not offloaded.
MASK_PREFIX, LM_HEAD_IN_ENCLAVE = "mask.", "tee.lm_head_in_enclave"
MASK_EXPONENTS = (-2, -1, 0, 1)  # mask scales are +-2^k, k from these: exact in float, so W' = B W A^-1 is exact


class WorkerLink(Protocol):
    """The enclave's only way to the worker (stip.server.tee_worker: in process, or over its WebSocket)."""

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """`W x + b` for block 0's linear `name` (or "lm_head") on padded rows x [n, d_in] -> [n, d_out]."""

    def body(self, session: str, h: torch.Tensor, start: int) -> torch.Tensor:
        """Blocks 1..L-1 on h [T, d] at positions start.. with the session's KV cache -> the last hidden state."""

    def close(self, session: str) -> None:
        """Free the session's KV cache at the worker."""


def base_parts(model: nn.Module) -> tuple[nn.Module, str, str]:
    """(base model, attribute of its decoder blocks, attribute of its final norm)."""
    base = model.base_model
    layers = next((a for a in LAYERS_ATTRS if isinstance(getattr(base, a, None), nn.ModuleList)), None)
    norm = next((a for a in FINAL_NORM_ATTRS if isinstance(getattr(base, a, None), nn.Module)), None)
    if layers is None or norm is None:
        raise ValueError(f"TEE mode does not know where {type(base).__name__} keeps its blocks and final norm "
                         f"(looked for {LAYERS_ATTRS} and {FINAL_NORM_ATTRS})")
    return base, layers, norm


def offloadable(module: nn.Module) -> list[str]:
    """Names (relative to `module`) of the linear maps the worker may compute: nn.Linear and GPT-2's Conv1D."""
    return [name for name, m in module.named_modules() if name and _weight_of(m) is not None]


def _weight_of(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
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


def input_groups(block: nn.Module) -> list[list[str]]:
    """Block 0's offloadable linears grouped by shared input (`SHARED_INPUT`; a group needs all its members): one
    request, one pad and one input mask `A` per group."""
    names = offloadable(block)
    groups, seen = [], set()
    for name in names:
        if name in seen:
            continue
        parent, _, leaf = name.rpartition(".")
        group = next(([f"{parent}.{m}" if parent else m for m in g] for g in SHARED_INPUT if leaf in g), [name])
        group = group if all(g in names for g in group) else [name]
        seen.update(group)
        groups.append(group)
    return groups


class Pads:
    """Fresh pads: a generator reseeded from the OS CSPRNG for every step (`fresh`), so no two queries share one."""

    def __init__(self):
        self.gen = torch.Generator()
        self.fresh()

    def fresh(self) -> None:
        self.gen.manual_seed(int.from_bytes(os.urandom(8), "little"))

    def draw(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.to(OFFLOAD_DTYPE).pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-3)
        return torch.randn(x.shape, generator=self.gen, dtype=OFFLOAD_DTYPE) * rms * PAD_SCALE


class OffloadedLinear(nn.Module):
    """Stands in for one linear map of block 0 (or the LM head): the worker computes `W' A (x + r)` with its masked
    copy `W' = B W A^-1`, the enclave applies `B^-1` and subtracts `W r` (computed here; in production ahead of
    time). In a group (`SHARED_INPUT`) the first member called computes the whole group in one request; the others
    take their part when called with the same tensor. `a`: the group's input mask; `b`: its outputs' masks side by
    side (None: identity)."""

    def __init__(self, name: str, weight: torch.Tensor, link: WorkerLink, pads: Pads,
                 group: list[tuple[str, torch.Tensor]] | None = None, waiting: dict | None = None,
                 a: Monomial | None = None, b: Monomial | None = None):
        super().__init__()
        self.name, self.link, self.pads, self.a, self.b = name, link, pads, a, b
        group = group or [(name, weight)]
        self.names = [n for n, _ in group]
        self.sizes = [int(w.shape[0]) for _, w in group]
        self.weight64 = torch.cat([w.detach().to(OFFLOAD_DTYPE) for _, w in group])  # [sum out, in]
        self.out_features = int(weight.shape[0])
        self.waiting = waiting if waiting is not None else {}  # name -> (input tensor, its output), this step only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hit = self.waiting.pop(self.name, None)
        if hit is not None and hit[0] is x:
            return hit[1]
        rows = x.reshape(-1, x.shape[-1])
        r = self.pads.draw(rows)
        sent = rows.to(OFFLOAD_DTYPE) + r
        y = self.link.linear(GROUP_SEP.join(self.names), sent if self.a is None else self.a.apply(sent))
        y = y.to(OFFLOAD_DTYPE)
        if self.b is not None:
            y = self.b.invert(y)
        parts = (y - r @ self.weight64.t()).to(x.dtype).split(self.sizes, dim=-1)
        mine = None
        for name, part in zip(self.names, parts):
            part = part.reshape(*x.shape[:-1], part.shape[-1])
            if name == self.name:
                mine = part
            else:
                self.waiting[name] = (x, part)
        return mine


class LocalLinear(nn.Module):
    """A tied model's LM head, computed in the enclave: its weight is the embedding table (in `pc` and `p`), which
    the worker must not hold in any form."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight.detach().float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.weight.t()


def _config_of(config):
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return copy.deepcopy(config)
    if isinstance(config, (str, Path)):
        config = json.loads(Path(config).read_text())
    config = dict(config)
    return AutoConfig.for_model(config.pop("model_type"), **config)


def trimmed_config(config, first: int, stop: int):
    """The config of blocks [first, stop) as a model of their own (per-layer lists cut to match)."""
    c = copy.deepcopy(config)
    c.num_hidden_layers = stop - first
    if isinstance(getattr(c, "layer_types", None), list):
        c.layer_types = c.layer_types[first:stop]
    if getattr(c, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("TEE mode: scale_attn_by_inverse_layer_idx ties attention scales to layer numbers; "
                         "not supported")
    return c


# ------------------------------------------------------------------ the enclave bundle's tensors (developer side)

def enclave_tensors(server_state: dict[str, torch.Tensor], config, client_key, embedding: dict[str, torch.Tensor],
                    embedding_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """What the enclave holds, named as `EnclaveModel.from_tensors` reads it: `p` and `pc` (the client key), the
    plain embedding table (and GPT-2's positions), the PERMUTED block-0 weights, final norm and LM head (as the
    server bundle holds them), to which `stip protect --tee` adds the worker's secret bases (stip.developer.tee)."""
    config = _config_of(config)
    skeleton, base, layers_attr, norm_attr, prefix = _skeleton(config)
    out = {f"{name}.{k}": v.contiguous() for name, perm in ((RESID, client_key.resid), (VOCAB, client_key.vocab))
           for k, v in (("perm", perm.perm), ("sign", perm.sign)) if v is not None}
    out[TOKEN_EMBEDDING] = embedding["token"].contiguous()
    if "position" in embedding:
        out[POSITION_EMBEDDING] = embedding["position"].contiguous()
    out[EMBEDDING_SCALE] = torch.tensor(float(embedding_scale))
    wanted = {f"{prefix}{layers_attr}.0.": BLOCK_PREFIX, f"{prefix}{norm_attr}.": FINAL_NORM_PREFIX,
              "lm_head.": LM_HEAD_PREFIX}
    for name, t in server_state.items():
        for src, dst in wanted.items():
            if name.startswith(src):
                out[dst + name[len(src):]] = t.contiguous()
    for dst in wanted.values():
        if not any(k.startswith(dst) for k in out):
            raise ValueError(f"the server state holds no tensor for the enclave's {dst.rstrip('.')}")
    params = {n for n, _ in getattr(base, layers_attr)[0].named_parameters()}
    missing = sorted(params - {k[len(BLOCK_PREFIX):] for k in out if k.startswith(BLOCK_PREFIX)})
    if missing:  # e.g. MoE experts, stored per expert in checkpoints and fused in the modules
        raise ValueError(f"TEE mode does not support {config.model_type} yet: block 0's checkpoint tensors do not "
                         f"match its module's parameters (no {missing[0]!r})")
    return out


def _prefix_of(model: nn.Module, base: nn.Module) -> str:
    name = next((n for n, m in model.named_modules() if m is base), "")
    return f"{name}." if name else ""


def _skeleton(config):
    """A 1-block causal LM of `config` on the meta device (no memory): (model, base, blocks attr, final norm attr,
    the base model's checkpoint name prefix)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(trimmed_config(config, 0, 1))
    base, layers_attr, norm_attr = base_parts(skeleton)
    return skeleton, base, layers_attr, norm_attr, _prefix_of(skeleton, base)


def block0_layout(config) -> tuple[str, nn.Module]:
    """(checkpoint name prefix of block 0, e.g. "model.layers.0.", block 0's module on the meta device)."""
    _, base, layers_attr, _, prefix = _skeleton(_config_of(config))
    return f"{prefix}{layers_attr}.0.", getattr(base, layers_attr)[0]


def is_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2) stores its weight as [in, out]."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def enclave_tensors_from_bundles(out: str | Path, trusted=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model config dict, enclave tensors) from a `stip protect` output folder's STANDARD server bundle and client
    bundle (both signature-checked), before `stip protect --tee` turns the server bundle into the worker's: block 0,
    the final norm and the LM head are read from the server shards, nothing else. Without the worker's masks."""
    from safetensors import safe_open

    from stip.client.bundle import ClientBundle
    from stip.common.files import read_manifest
    from stip.common.layout import CLIENT_DIR, SERVER_DIR

    out = Path(out)
    client = ClientBundle.load(out / CLIENT_DIR, trusted=trusted)
    server = out / SERVER_DIR
    manifest = read_manifest(server, role="server", trusted=trusted)
    config = json.loads((server / "config.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(f for f in manifest["files"] if f.endswith(".safetensors")):
        with safe_open(str(server / shard), "pt") as f:
            for name in f.keys():
                if ".0." in name or "norm" in name or "ln_f" in name or name.startswith("lm_head"):
                    state[name] = f.get_tensor(name)
    raw = _client_embedding(client)
    embedding = {k: v for k, v in raw.items() if v is not None}
    return config, enclave_tensors(state, config, client.key, embedding,
                                   float(client.config.get("embedding_scale", 1.0)))


def _client_embedding(client) -> dict[str, torch.Tensor | None]:
    from safetensors.torch import load_file

    from stip.common.layout import EMBEDDING_FILE

    return {name: load_file(str(client.path / f))["weight"] if client.has_file(f := EMBEDDING_FILE.format(name))
            else None for name in ("token", "position")}


# ------------------------------------------------------------------ the enclave's model

@dataclass
class EnclaveSession:
    """One conversation: block 0's KV cache (here, never at the worker) and how many tokens it holds."""

    id: str
    cache: object
    position: int = 0
    timings: dict = field(default_factory=lambda: {"enclave_s": 0.0, "worker_s": 0.0})


class _TimedLink:
    """Counts the time spent waiting on the worker (the rest of a step is enclave time)."""

    def __init__(self, link: WorkerLink):
        self.link, self.seconds = link, 0.0

    def _timed(self, fn, *args):
        import time

        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0

    def linear(self, name, x):
        return self._timed(self.link.linear, name, x)

    def body(self, session, h, start):
        return self._timed(self.link.body, session, h, start)

    def close(self, session):
        return self.link.close(session)


def _perm_from(tensors: dict[str, torch.Tensor], name: str):
    from stip.common.transforms import SignedPermutation

    return SignedPermutation(tensors[f"{name}.perm"].long(), tensors.get(f"{name}.sign"))


class EnclaveModel:
    """Block 0, the embedding in `p`, the final norm and the un-permuting of the logits; everything else through a
    `WorkerLink`. `prefill(session, ids)` / `decode(session, id)` return plain float32 logits of the last position."""

    def __init__(self, config, tensors: dict[str, torch.Tensor], link: WorkerLink):
        from transformers import AutoModel

        self.config = _config_of(config)
        self.link = _TimedLink(link)
        self.pads = Pads()
        self.resid, self.vocab = _perm_from(tensors, RESID), _perm_from(tensors, VOCAB)
        scale = float(tensors.get(EMBEDDING_SCALE, torch.tensor(1.0)))
        self.token_embedding = self.resid.apply(tensors[TOKEN_EMBEDDING].float() * scale, 1, "out").contiguous()
        self.vocab_size = self.token_embedding.shape[0]
        one = trimmed_config(self.config, 0, 1)
        base = AutoModel.from_config(one).eval()
        self.base, layers_attr, norm_attr = base, *base_parts(base)[1:]
        emb = base.get_input_embeddings()
        emb.weight = nn.Parameter(torch.empty(0, emb.embedding_dim), requires_grad=False)  # the table lives above
        pos_attr = next((a for a in POSITION_ATTRS if hasattr(base, a)), None)
        if pos_attr is not None:
            pos = self.resid.apply(tensors[POSITION_EMBEDDING].float(), 1, "out")
            getattr(base, pos_attr).weight = nn.Parameter(pos.contiguous(), requires_grad=False)
        block = getattr(base, layers_attr)[0]
        _load(block, tensors, BLOCK_PREFIX, "block 0")
        self.final_norm = copy.deepcopy(getattr(base, norm_attr))
        _load(self.final_norm, tensors, FINAL_NORM_PREFIX, "the final norm")
        setattr(base, norm_attr, nn.Identity())  # the base model's output is h1 p, before any norm
        self.waiting: dict = {}
        groups = input_groups(block)
        weights = {name: _weight_of(block.get_submodule(name))[0] for g in groups for name in g}
        masks = {name: (_mask(tensors, name, "in"), _mask(tensors, name, "out")) for name in weights}
        for group in groups:
            a, b = masks[group[0]][0], Monomial.concat([masks[g][1] for g in group])
            for name in group:
                parent, _, leaf = name.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, leaf,
                        OffloadedLinear(name, weights[name], self.link, self.pads, [(g, weights[g]) for g in group],
                                        self.waiting, a=a, b=b))
        head = tensors[LM_HEAD_PREFIX + "weight"]
        self.lm_head_local = bool(tensors.get(LM_HEAD_IN_ENCLAVE, torch.tensor(0)).item())
        self.lm_head = LocalLinear(head) if self.lm_head_local else \
            OffloadedLinear(LM_HEAD, head, self.link, self.pads, a=_mask(tensors, LM_HEAD, "in"))
        self.max_positions = getattr(self.config, "max_position_embeddings", None)
        self._lock = threading.Lock()  # one step at a time: the pads and block 0 are shared by all sessions

    @classmethod
    def from_tensors(cls, config, tensors: dict[str, torch.Tensor], link: WorkerLink) -> "EnclaveModel":
        return cls(config, tensors, link)

    # ------------------------------------------------------------ sessions

    def new_session(self) -> EnclaveSession:
        from transformers import DynamicCache

        return EnclaveSession(os.urandom(12).hex(), DynamicCache(config=self.base.config))

    def close(self, s: EnclaveSession) -> None:
        self.link.close(s.id)

    def _step(self, s: EnclaveSession, ids: torch.Tensor) -> torch.Tensor:
        with self._lock:
            return self._locked_step(s, ids)

    @torch.no_grad()
    def _locked_step(self, s: EnclaveSession, ids: torch.Tensor) -> torch.Tensor:
        import time

        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("no tokens to run")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token id out of range [0, {self.vocab_size})")
        if self.max_positions and s.position + ids.numel() > self.max_positions:
            raise ValueError(f"sequence would reach {s.position + ids.numel()} tokens; the model has "
                             f"{self.max_positions} positions")
        t0, w0 = time.perf_counter(), self.link.seconds
        self.pads.fresh()  # new pads for every query
        self.waiting.clear()
        start = s.position
        positions = torch.arange(start, start + ids.numel())
        x = self.token_embedding[ids].unsqueeze(0)  # x p
        h1 = self.base(inputs_embeds=x, past_key_values=s.cache, use_cache=True, position_ids=positions[None],
                       cache_position=positions).last_hidden_state[0]  # h1 p: block 0 ran here
        h = self.link.body(s.id, h1.contiguous(), start)  # blocks 1..L-1 at the worker
        s.position += ids.numel()
        logits = self.lm_head(self.final_norm(h[-1:].float()))  # in pc order
        cap = getattr(self.config, "final_logit_softcapping", None)  # Gemma 2/3: as their ForCausalLM does
        if cap:
            logits = torch.tanh(logits / cap) * cap
        plain = self.vocab.invert(logits.float(), 1)[0]
        total = time.perf_counter() - t0
        s.timings["worker_s"] += self.link.seconds - w0
        s.timings["enclave_s"] += total - (self.link.seconds - w0)
        return plain

    def prefill(self, s: EnclaveSession, ids) -> torch.Tensor:
        """Run the prompt; the plain logits [V] of its last position."""
        return self._step(s, ids)

    def decode(self, s: EnclaveSession, token: int) -> torch.Tensor:
        return self._step(s, torch.tensor([int(token)]))

    def generate(self, ids, params=None, top_logprobs: int = 0):
        """Yield (token, top [(id, logprob)] or None) until max_tokens, sampling with stip.common.sampling."""
        from stip.common.sampling import Sampler, SamplingParams

        params = params or SamplingParams()
        sampler = Sampler(params, history=list(map(int, ids)))
        s = self.new_session()
        try:
            logits = self.prefill(s, ids)
            for i in range(params.max_tokens):
                token = sampler.from_logits(logits)
                top = None
                if top_logprobs:
                    lp = torch.log_softmax(logits.float(), -1)
                    v, k = torch.topk(lp, min(top_logprobs, lp.numel()))
                    top = list(zip(k.tolist(), v.tolist()))
                sampler.observe(token)
                yield token, top
                if i + 1 < params.max_tokens:
                    logits = self.decode(s, token)
        finally:
            self.close(s)


def _mask(tensors: dict[str, torch.Tensor], linear: str, side: str) -> Monomial:
    """The secret basis of one side of one offloaded linear; an enclave bundle without it predates them."""
    m = Monomial.from_tensors(tensors, f"{MASK_PREFIX}{linear}.{side}")
    if m is None:
        raise ValueError(f"the enclave tensors hold no {side}put mask for {linear!r}: this enclave bundle was "
                         "written by an older STIP; protect the model again with --tee")
    return m


def _load(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, what: str) -> None:
    """Load `prefix`-named tensors into `module`; every parameter must be given (buffers may be derived)."""
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing, unexpected = module.load_state_dict(state, strict=False)
    params = {n for n, _ in module.named_parameters()}
    missing = [m for m in missing if m in params]
    if missing or unexpected:
        raise ValueError(f"enclave tensors for {what}: missing {missing[:3]}, unexpected {unexpected[:3]}")
