"""The TEE extraction experiment's model: the plain LLaMA (a tiny random one for --quick), block 0's output (what
the enclave computes) and the greedy next token with block 0's output or the input embeddings replaced."""

from __future__ import annotations

import torch


def tiny_llama(seed: int):
    """A tiny random LLaMA (hidden 48, 2 layers, vocab 97) for the quick run; norms randomised like tests/models.py."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            base = 1.0 if "norm" in name else 0.0
            prm.copy_(base + 0.3 * torch.randn(prm.shape, generator=g))
    return model


def load_model(name: str, seed: int):
    """The plain model: "tiny" (built here) or a name for stip.models.load_plain_model ("smollm2")."""
    if name == "tiny":
        return tiny_llama(seed)
    from stip.models import load_plain_model

    return load_plain_model(name)[0]


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's list of decoder blocks (LLaMA-style `model.layers`; GPT-2's `transformer.h`)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return base.layers if hasattr(base, "layers") else base.h


class _Stop(Exception):
    """Raised by a hook to end a forward once block 0 has run."""


def first_output(out):
    """A module's output tensor (decoder layers return a tuple in some transformers versions)."""
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def block0_output(model, ids: torch.Tensor) -> torch.Tensor:
    """h1 = block 0's output (embedding + block 0), stopping the forward there: what the enclave computes."""
    seen = {}

    def grab(_mod, _inp, out):
        seen["h"] = first_output(out)
        raise _Stop

    handle = decoder_layers(model)[0].register_forward_hook(grab)
    try:
        model.get_decoder()(input_ids=ids)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["h"].float()


@torch.no_grad()
def body_top1(model, ids: torch.Tensor, h1: torch.Tensor | None = None, embeds: torch.Tensor | None = None):
    """Greedy next token at every position: the real model, with block 0's output replaced by `h1` (the worker's
    body behind a replacement of the enclave's part) or its input embeddings replaced by `embeds`."""
    def swap(_mod, _inp, out):
        return (h1,) + tuple(out[1:]) if isinstance(out, tuple) else h1

    handle = decoder_layers(model)[0].register_forward_hook(swap) if h1 is not None else None
    try:
        logits = model(inputs_embeds=embeds).logits if embeds is not None else model(input_ids=ids).logits
    finally:
        if handle is not None:
            handle.remove()
    return logits.argmax(-1)
