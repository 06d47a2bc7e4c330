"""AloePri on a whole LLaMA-family model: the plain model loaded once, its keys' shapes, kappa estimated on it, and
every tensor transformed (`AloepriModel.tensors`). The output is a standard `...ForCausalLM` checkpoint whose hidden
size is d + 2h (`head_dim` written out, since heads x head_dim no longer equals the hidden size), untied, in the
secret vocabulary order: stock transformers and vLLM load it as they load the plain model.

In memory: the plain model is needed whole to estimate kappa on its hidden states, so this mode does not stream
(fine for the sizes it is meant for here; see docs/aloepri.md).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from stip.common.architectures import DROP, LM_HEAD, architecture_for
from stip.common.architectures.llama import LLAMA
from stip.developer.aloepri_kappa import calibration_ids, estimate_kappa, obfuscated_eps
from stip.developer.aloepri_keys import AloepriGeometry, AloepriKey
from stip.developer.aloepri_options import AloepriOptions, fitted_h
from stip.developer.aloepri_transform import EMBEDDING, LM_HEAD as LM_HEAD_NAME, NORMS, AloepriTransform, \
    noisy_embedding
from stip.developer.checkpoint import Checkpoint
from stip.errors import UnsupportedModelError

FAMILIES = LLAMA.model_types  # llama, mistral, qwen2: RoPE, RMSNorm, SwiGLU, GQA, optional QKV biases


def check_family(config) -> None:
    """AloePri here covers the LLaMA family (no Q/K norms, no MoE, default RoPE layout)."""
    if config.model_type not in FAMILIES:
        raise UnsupportedModelError(f"{config.model_type} models do not support --harden aloepri; it covers "
                                    f"LLaMA-family models ({', '.join(FAMILIES)})")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"--harden aloepri: {config.model_type} with {config.hidden_act} is not SwiGLU")


def plain_state(ck: Checkpoint) -> tuple[dict[str, torch.Tensor], bool]:
    """Every checkpoint tensor under its canonical name (buffers dropped), and whether the LM head is tied (then
    the state holds no LM head: it is the embedding)."""
    arch = architecture_for(ck.config)
    tied = bool(getattr(ck.config, "tie_word_embeddings", False))
    state = {}
    for name, t in ck.tensors():
        m = arch.match(name)
        if m.rule.party == DROP or (tied and m.rule.role == LM_HEAD):
            continue
        state[m.canonical] = t
    return state, tied


def plain_model(config, state: dict[str, torch.Tensor]):
    """The plain model in float32, built from `state` (kappa is estimated on its hidden states)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if k != LM_HEAD_NAME or not config.tie_word_embeddings]
    if missing or unexpected:
        raise UnsupportedModelError(f"--harden aloepri: the checkpoint does not load as {type(model).__name__} "
                                    f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    return model.eval()


def geometry(config, model) -> AloepriGeometry:
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    freqs = model.model.rotary_emb.inv_freq.double().tolist()  # the RoPE frequency of each pair, as the model has it
    return AloepriGeometry(int(config.hidden_size), int(config.vocab_size), int(config.num_hidden_layers), heads,
                           int(getattr(config, "num_key_value_heads", None) or heads), head_dim,
                           int(config.intermediate_size), tuple(freqs))


class AloepriModel:
    """A plain LLaMA-family model and its AloePri key: `tensors()` yields the server's tensors, `config()` its
    config (special ids still in plain order; the bundle writer remaps them)."""

    def __init__(self, config, state: dict[str, torch.Tensor], tied: bool, options: AloepriOptions, seed: bytes,
                 calibration: torch.Tensor | None = None, plain=None):
        """`state`: the plain tensors by canonical name (no LM head when `tied`); `plain`: the plain model built
        from them, where the caller has it (otherwise it is built here, for kappa)."""
        check_family(config)
        self.plain_config, self.state, self.tied = config, state, tied
        model = plain if plain is not None else plain_model(config, state)
        shapes = geometry(config, model)
        self.options = replace(options, h=fitted_h(options.h, shapes.hidden, shapes.heads))
        self.key = AloepriKey(seed, self.options, shapes)
        self.embedding = noisy_embedding(self.key, state[EMBEDDING])
        ids = calibration if calibration is not None else calibration_ids(self.key, options.calibration_tokens)
        self.kappa = estimate_kappa(self.key, model, self.embedding, torch.as_tensor(ids).reshape(-1, ids.shape[-1]))
        del model
        norms = {n: t.double() for n, t in state.items() if NORMS.fullmatch(n)}
        head = state[EMBEDDING if tied else LM_HEAD_NAME].double()
        self.transform = AloepriTransform(self.key, norms, self.kappa, self.embedding, head)

    @classmethod
    def from_checkpoint(cls, ck: Checkpoint, options: AloepriOptions, seed: bytes,
                        calibration: torch.Tensor | None = None) -> "AloepriModel":
        check_family(ck.config)
        state, tied = plain_state(ck)
        return cls(ck.config, state, tied, options, seed, calibration)

    def names(self) -> list[str]:
        """The server's tensor names: the plain ones, plus the LM head of a tied model (the bundle is untied)."""
        return list(self.state) + ([LM_HEAD_NAME] if self.tied else [])

    def tensors(self):
        """(name, tensor) of every server tensor, in the checkpoint's dtype (float32 for a GGUF model)."""
        for name in self.names():
            yield name, self.tensor(name)

    def tensor(self, name: str) -> torch.Tensor:
        """One server tensor (a name of `names()`), in the checkpoint's dtype."""
        plain = self.state.get(name)
        t = self.transform(name, None if plain is None else plain.double())
        return t.to(self.state[EMBEDDING].dtype).contiguous()

    def config(self):
        """The server's config: hidden size d + 2h, head_dim written out, untied, epsilon rescaled."""
        c = copy.deepcopy(self.plain_config)
        c.head_dim = self.key.geometry.head_dim
        c.hidden_size = self.key.width
        c.tie_word_embeddings = False
        c.rms_norm_eps = obfuscated_eps(c.rms_norm_eps, self.kappa)
        return c

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors())
