"""Where TEE mode's parts live in a transformers causal LM: its blocks, final norm, learned positions, block 0's
offloadable linears and their input groups. The developer (the worker bundle, the enclave bundle), the server's TEE
worker and the enclave all find them by these rules."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from stip.common.tee.linalg import weight_of

# Where the parts live in a transformers base model (`model.base_model`): rules as data, first match wins.
LAYERS_ATTRS = ("layers", "h")  # the decoder blocks
FINAL_NORM_ATTRS = ("norm", "ln_f")  # the norm after the last block
POSITION_ATTRS = ("wpe",)  # learned absolute positions, added inside the base model's forward (GPT-2)
# Sibling linears the model applies to the same input tensor: one request, one pad, for the group (rules as data).
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


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
    return [name for name, m in module.named_modules() if name and weight_of(m) is not None]


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


def config_of(config):
    """A transformers config from a config object (copied), a config.json path or its dict."""
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


def _prefix_of(model: nn.Module, base: nn.Module) -> str:
    name = next((n for n, m in model.named_modules() if m is base), "")
    return f"{name}." if name else ""


def skeleton(config):
    """A 1-block causal LM of `config` on the meta device (no memory): (model, base, blocks attr, final norm attr,
    the base model's checkpoint name prefix)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(trimmed_config(config, 0, 1))
    base, layers_attr, norm_attr = base_parts(model)
    return model, base, layers_attr, norm_attr, _prefix_of(model, base)


def block0_layout(config) -> tuple[str, nn.Module]:
    """(checkpoint name prefix of block 0, e.g. "model.layers.0.", block 0's module on the meta device)."""
    _, base, layers_attr, _, prefix = skeleton(config_of(config))
    return f"{prefix}{layers_attr}.0.", getattr(base, layers_attr)[0]
