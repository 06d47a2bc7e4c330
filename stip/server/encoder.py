"""The one-shot engine: encoders and classifiers (BERT, RoBERTa, ViT), one request in, one output out, no KV cache.

The server bundle is a stock transformers checkpoint of the class its config names (`BertModel`,
`BertForSequenceClassification`, `ViTForImageClassification`, ...) without the client-side module: the client runs
that module (BERT's embeddings, ViT's patch embedding) on its plaintext and sends its output in the secret basis.
How the server runs the rest is per family (`BODIES`): either the client-side submodule is replaced by a
pass-through and the model is called with `inputs_embeds`, or a function of the family's own runs the body.
Requests run one at a time on the server's single worker thread (`concurrent_steps = 1`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from stip.common.tasks import FEATURE_EXTRACTION, FILL_MASK, IMAGE_CLASSIFICATION, ONE_SHOT_TASKS, TEXT_CLASSIFICATION
from stip.errors import StipError
from stip.server.engine import Engine

log = logging.getLogger("stip.server")

MAX_BATCH = 64  # sequences (or images) per request

# What each task's reply holds: hidden states [B, T, d] in `p`, or logits ([B, L] labels, [B, T, V] vocabulary).
REPLY_KIND = {FEATURE_EXTRACTION: "hidden", TEXT_CLASSIFICATION: "logits", FILL_MASK: "logits",
              IMAGE_CLASSIFICATION: "logits"}


class PassThrough(nn.Module):
    """Stands where the client-side module was: the request already holds its output."""

    def forward(self, *args, inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if inputs_embeds is None:  # passed by position (DistilBERT: embeddings(input_ids, inputs_embeds, ...))
            inputs_embeds = next((a for a in args if torch.is_tensor(a) and a.is_floating_point()), None)
        if inputs_embeds is None:
            raise ValueError("the protected model runs from the client's embeddings only (inputs_embeds)")
        return inputs_embeds


@dataclass(frozen=True)
class Body:
    """How the server runs one family from the client's embeddings.

    `client_module`: the base model's submodule the client runs; it is replaced by `PassThrough` and the model is
    called as `model(inputs_embeds=x, attention_mask=mask)`. Or `run(model, x, mask)` -> the model's output object
    (with `last_hidden_state` or `logits`), for a family whose forward cannot take embeddings.
    `max_tokens(config)`: the longest sequence the model takes (default: max_position_embeddings)."""

    client_module: str | None = None
    run: Callable[[Any, torch.Tensor, torch.Tensor | None], Any] | None = None
    max_tokens: Callable[[Any], int] | None = None


def _vit_body(model, x: torch.Tensor, mask: torch.Tensor | None):
    """ViTForImageClassification from the patch sequence (CLS first, positions added): its blocks, final norm and
    classifier on the CLS token, as its own forward runs them. That forward cannot take embeddings: it always calls
    the embeddings module on pixels (and reads the patch projection's dtype)."""
    from transformers.masking_utils import create_bidirectional_mask
    from transformers.modeling_outputs import ImageClassifierOutput

    vit = model.vit
    m = create_bidirectional_mask(config=vit.config, inputs_embeds=x, attention_mask=mask)
    h = x
    for layer in vit.layers:
        h = layer(h, m)
    return ImageClassifierOutput(logits=model.classifier(vit.layernorm(h)[:, 0]))


def _patches(config) -> int:
    """ViT's sequence: the CLS token and one token per patch."""
    size, patch = config.image_size, config.patch_size
    (h, w), (ph, pw) = [s if isinstance(s, (list, tuple)) else (s, s) for s in (size, patch)]
    return 1 + (h // ph) * (w // pw)


BODIES: dict[str, Body] = {
    "bert": Body("embeddings"),
    "vit": Body("embeddings", run=_vit_body, max_tokens=_patches),
    # RoBERTa numbers positions from padding_idx + 1: two of its position rows are never a real token's
    "roberta": Body("embeddings", max_tokens=lambda c: int(c.max_position_embeddings) - int(c.pad_token_id) - 1),
    "distilbert": Body("embeddings"),
}


class EncoderEngine(Engine):
    """One forward per request: embeddings [B, T, d] in `p` (and a padding mask) -> the task's output."""

    name = "transformers (one-shot)"
    kv_bytes_per_token = 1  # no KV cache; the admission budget counts a request's tokens while it runs

    def __init__(self, model, manifest: dict, task: str):
        if task not in ONE_SHOT_TASKS:
            raise StipError(f"the one-shot engine serves {', '.join(ONE_SHOT_TASKS)} models, not {task}")
        self.model, self.manifest, self.task = model.eval(), manifest, task
        config = model.config
        self.config = config
        self.model_type = str(config.model_type)
        body = BODIES.get(self.model_type)
        if body is None:
            raise StipError(f"no one-shot server body for {self.model_type!r} models; families: {', '.join(BODIES)}")
        self.body = body
        if body.client_module is not None:  # the client's module is not in the bundle: never run its random weights
            setattr(model.base_model, body.client_module, PassThrough())
        self.hidden_size = int(config.hidden_size)
        self.vocab_size = int(getattr(config, "vocab_size", 0) or 0)
        self.labels = int(config.num_labels) if task in (TEXT_CLASSIFICATION, IMAGE_CLASSIFICATION) else 0
        maxpos = body.max_tokens(config) if body.max_tokens else getattr(config, "max_position_embeddings", None)
        self.max_positions = int(maxpos) if maxpos else None
        self.max_batch = MAX_BATCH
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device

    @classmethod
    def from_bundle(cls, bundle, dtype: torch.dtype = torch.float32, device: str = "cpu",
                    trusted=None) -> "EncoderEngine":
        from stip.server.model import load_protected_model

        model, manifest = load_protected_model(bundle, dtype=dtype, device=device, trusted=trusted)
        return cls(model, manifest, bundle_task(model.config))

    def reply_shape(self, batch: int, tokens: int) -> list[int]:
        """The shape `encode` returns for [batch, tokens, d] embeddings."""
        if self.task == FEATURE_EXTRACTION:
            return [batch, tokens, self.hidden_size]
        if self.task == FILL_MASK:
            return [batch, tokens, self.vocab_size]
        return [batch, self.labels]

    def encode(self, embeds: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """embeds [B, T, d] (any float dtype), mask [B, T] (1 = token, 0 = padding) or None -> float32 output."""
        x = embeds.to(device=self.device, dtype=self.dtype)
        m = None if mask is None else mask.to(device=self.device, dtype=torch.long)
        self._running, self._stepped = 1, True
        try:
            with torch.inference_mode():
                out = self.body.run(self.model, x, m) if self.body.run else self.model(inputs_embeds=x,
                                                                                        attention_mask=m)
        finally:
            self._running = 0
        result = out.last_hidden_state if self.task == FEATURE_EXTRACTION else out.logits
        return result.float().cpu()

    # One-shot models hold no sessions: the server refuses session requests before any of these is reached.
    def new_state(self) -> Any:
        raise StipError(f"a {self.task} model serves one-shot requests, not sessions")

    def prefill(self, state, embeds, all_positions: bool = False):
        raise StipError(f"a {self.task} model serves one-shot requests, not sessions")

    def decode(self, state, embed):
        raise StipError(f"a {self.task} model serves one-shot requests, not sessions")

    def length(self, state) -> int:
        return 0

    def free(self, state) -> None:
        pass


def bundle_task(config) -> str:
    """The pipeline task of a server bundle's config (its class decides: BertModel -> feature-extraction)."""
    from stip.common.architectures import task_of

    return task_of(config)


def is_one_shot(bundle) -> bool:
    """Whether a server bundle holds a one-shot model (read from its config.json; the signature is checked when the
    engine loads it)."""
    from transformers import AutoConfig

    try:
        return bundle_task(AutoConfig.from_pretrained(bundle)) in ONE_SHOT_TASKS
    except Exception:  # noqa: BLE001 - an unreadable config is reported by the loader, with its own message
        return False
