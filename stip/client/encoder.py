"""The client's half of a text encoder (BERT, RoBERTa): text in; sentence embeddings, labels or masked tokens out.

The client tokenizes with padding, runs the model's own embeddings module (token, position and token-type
embeddings, then its LayerNorm: plain tensors from the bundle's module shards, in transformers' own class) and
applies `p`; it sends that and the padding mask to `/v1/encode` in one request, and un-permutes the reply: hidden
states with `p`, a classifier's logits with the label permutation, a masked-LM head's with `pc`. Sentence
embeddings are pooled here, as the model's sentence-transformers configuration says (copied into the client bundle
by `stip protect`; mean pooling where there is none).
"""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch

from stip.client import hf
from stip.client.errors import TaskError  # noqa: F401 - re-exported
from stip.client.bundle import ClientBundle
from stip.common.tasks import FEATURE_EXTRACTION, FILL_MASK, TEXT_CLASSIFICATION
from stip.errors import BundleError, StipError

BATCH = 32  # sequences per request (the server takes at most 64)


@dataclass(frozen=True)
class Module:
    """A family's client-side module: the transformers class, and the longest input its positions allow."""

    cls: str  # "module:Class"
    max_tokens: Callable = lambda c: int(c.max_position_embeddings)


MODULES = {
    "bert": Module("transformers.models.bert.modeling_bert:BertEmbeddings"),
    # RoBERTa numbers positions from padding_idx + 1
    "roberta": Module("transformers.models.roberta.modeling_roberta:RobertaEmbeddings",
                      lambda c: int(c.max_position_embeddings) - int(c.pad_token_id) - 1),
    "distilbert": Module("transformers.models.distilbert.modeling_distilbert:Embeddings"),  # no token types
}

POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens")  # sentence-transformers' order
KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")


def require_task(bundle: ClientBundle, *tasks: str, what: str) -> None:
    if bundle.task not in tasks:
        raise TaskError(f"{what} needs a {' or '.join(tasks)} model; client bundle {bundle.path} holds a "
                        f"{bundle.task} model")


class TextEncoder:
    """Runs one text encoder bundle against a `stip.client.transport.Connection`."""

    def __init__(self, bundle: ClientBundle, connection, batch_size: int = BATCH):
        self.bundle, self.connection, self.batch_size = bundle, connection, batch_size
        require_task(bundle, FEATURE_EXTRACTION, TEXT_CLASSIFICATION, FILL_MASK, what="a text encoder request")
        self.config = hf.model_config(bundle)
        spec = MODULES.get(self.config.model_type)
        if spec is None:
            raise BundleError(f"no client-side text module for {self.config.model_type!r} models; families: "
                              f"{', '.join(MODULES)}")
        self.spec = spec
        self.max_tokens = spec.max_tokens(self.config)
        sbert = bundle.path / "sentence_bert_config.json"  # sentence-transformers truncates at its max_seq_length
        if bundle.has_file(sbert.name):
            limit = json.loads(sbert.read_text()).get("max_seq_length")
            if isinstance(limit, int) and limit > 0:
                self.max_tokens = min(self.max_tokens, limit)

    @cached_property
    def module(self) -> torch.nn.Module:
        """The model's own embeddings module, with the bundle's plain weights; every tensor must be there."""
        path, name = self.spec.cls.split(":")
        module = getattr(importlib.import_module(path), name)(self.config).eval()
        state = hf.module_state(self.bundle)
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise BundleError(f"client bundle {self.bundle.path}: the embeddings module "
                              f"{'lacks ' + repr(missing[0]) if missing else 'has unexpected ' + repr(unexpected[0])}")
        return module.float()

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or not texts:
            raise ValueError("texts must be a non-empty list of strings")
        return hf.tokenizer(self.bundle)(texts, padding=True, truncation=True, max_length=self.max_tokens,
                                     return_tensors="pt")

    def protected_embeddings(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The module's output for a tokenized batch, in the server's secret basis: all the server ever gets."""
        kw = {"input_ids": batch["input_ids"]}
        if "token_type_ids" in batch and "token_type_ids" in inspect.signature(self.module.forward).parameters:
            kw["token_type_ids"] = batch["token_type_ids"]
        with torch.inference_mode():
            x = self.module(**kw)
        return self.bundle.key.resid.apply(x, -1, "out").contiguous()

    def _run(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One request: the server's reply, un-permuted."""
        mask = batch["attention_mask"]
        b, t = mask.shape
        x = self.protected_embeddings(batch)
        task = self.bundle.task
        if task == FEATURE_EXTRACTION:
            out = self.connection.encode(x, mask, reply_shape=[b, t, x.shape[-1]])
            return self.bundle.key.resid.invert(out, -1)
        if task == FILL_MASK:
            out = self.connection.encode(x, mask, reply_shape=[b, t, self.bundle.vocab_size])
            return self.bundle.key.vocab.invert(out, -1)
        out = self.connection.encode(x, mask, reply_shape=[b, len(self.bundle.key.labels)])
        return self.bundle.key.labels.invert(out, -1)

    def hidden_states(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The last hidden states [B, T, d] (padded to the longest text) and the attention mask [B, T]."""
        require_task(self.bundle, FEATURE_EXTRACTION, what="hidden states")
        batch = self.tokenize(list(texts))
        return self._batched(batch), batch["attention_mask"]

    def _batched(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        n = batch["input_ids"].shape[0]
        parts = []
        for i in range(0, n, self.batch_size):
            sub = {k: v[i:i + self.batch_size] for k, v in batch.items()}
            if hf.tokenizer(self.bundle).padding_side == "right":  # trim the padding this slice does not need
                longest = int(sub["attention_mask"].sum(1).max())
                sub = {k: v[:, :longest] for k, v in sub.items()}
            parts.append(self._run(sub))
        if parts and parts[0].dim() == 3:  # pad slices back to the batch's common length
            t = batch["input_ids"].shape[1]
            parts = [torch.nn.functional.pad(p, (0, 0, 0, t - p.shape[1])) for p in parts]
        return torch.cat(parts)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Sentence embeddings [B, d], pooled (and normalized) as the model's sentence-transformers config says."""
        require_task(self.bundle, FEATURE_EXTRACTION, what="sentence embeddings")
        hidden, mask = self.hidden_states(texts)
        return self.pooling.pool(hidden, mask)

    @cached_property
    def pooling(self) -> "Pooling":
        return Pooling.from_bundle(self.bundle)

    def classify(self, texts: list[str], top_k: int = 1) -> list[list[dict]]:
        """Per text, the `top_k` labels with their scores (softmax; sigmoid for multi-label models)."""
        require_task(self.bundle, TEXT_CLASSIFICATION, what="text classification")
        logits = self._batched(self.tokenize(list(texts)))
        if getattr(self.config, "problem_type", None) == "multi_label_classification":
            scores = torch.sigmoid(logits)
        else:
            scores = torch.softmax(logits, -1)
        return top_labels(scores, self.config.id2label, top_k)

    def fill_mask(self, text: str, top_k: int = 5) -> list[dict]:
        """The `top_k` tokens for the tokenizer's mask token in `text` (exactly one), best first."""
        require_task(self.bundle, FILL_MASK, what="fill-mask")
        tok = hf.tokenizer(self.bundle)
        if not isinstance(text, str):
            raise ValueError("fill_mask takes one string")
        batch = self.tokenize([text])
        ids = batch["input_ids"][0]
        where = (ids == tok.mask_token_id).nonzero().flatten().tolist()
        if len(where) != 1:
            raise ValueError(f"the text must hold the mask token {tok.mask_token!r} exactly once; it holds it "
                             f"{len(where)} times")
        probs = torch.softmax(self._run(batch)[0, where[0]], -1)
        values, indices = probs.topk(min(int(top_k), probs.shape[0]))
        out = []
        for score, token in zip(values.tolist(), indices.tolist()):
            filled = ids.clone()
            filled[where[0]] = token
            out.append({"score": score, "token": token, "token_str": tok.decode([token]),
                        "sequence": tok.decode(filled, skip_special_tokens=True)})
        return out


def top_labels(scores: torch.Tensor, id2label: dict, top_k: int) -> list[list[dict]]:
    """[B, L] scores -> per row the top_k {"label", "score"}, best first (labels named by the config's id2label)."""
    k = max(1, min(int(top_k), scores.shape[-1]))
    values, indices = scores.topk(k, dim=-1)
    names = {int(i): str(n) for i, n in (id2label or {}).items()}
    return [[{"label": names.get(i, f"LABEL_{i}"), "score": v} for v, i in zip(vs, ids)]
            for vs, ids in zip(values.tolist(), indices.tolist())]


@dataclass(frozen=True)
class Pooling:
    """How hidden states become one sentence embedding: sentence-transformers' Pooling modes, then Normalize."""

    modes: tuple[str, ...] = ("mean_tokens",)
    normalize: bool = False

    @classmethod
    def from_bundle(cls, bundle: ClientBundle) -> "Pooling":
        """Read modules.json and the Pooling module's config; mean pooling without normalization if there are none.
        A pipeline with another module (a Dense layer) is refused by name: pooling alone would be wrong."""
        modules_file = bundle.path / "modules.json"
        if not bundle.has_file(modules_file.name):
            return cls()
        modules = json.loads(modules_file.read_text())
        modes: tuple[str, ...] = ("mean_tokens",)
        normalize = False
        for m in modules:
            kind = str(m.get("type", "")).rsplit(".", 1)[-1]
            if kind not in KNOWN_MODULES:
                raise BundleError(f"client bundle {bundle.path}: sentence-transformers module {m.get('type')!r} is "
                                  f"not supported (only {', '.join(KNOWN_MODULES)})")
            if kind == "Normalize":
                normalize = True
            if kind == "Pooling":
                conf_name = "/".join(filter(None, (str(m.get("path") or "").strip("/"), "config.json")))
                if not bundle.has_file(conf_name):
                    raise BundleError(f"client bundle {bundle.path}: its Pooling config {conf_name} is not listed "
                                      "in the signed manifest")
                conf = json.loads((bundle.path / conf_name).read_text())
                other = [k for k, v in conf.items() if k.startswith("pooling_mode_") and v
                         and k.removeprefix("pooling_mode_") not in POOLING_MODES]
                if other:
                    raise BundleError(f"client bundle {bundle.path}: pooling mode {other[0]!r} is not supported")
                modes = tuple(mo for mo in POOLING_MODES if conf.get(f"pooling_mode_{mo}"))
        return cls(modes or ("mean_tokens",), normalize)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        lengths = m.sum(1).clamp(min=1e-9)
        parts = []
        for mode in self.modes:
            if mode == "cls_token":
                parts.append(hidden[:, 0])
            elif mode == "max_tokens":
                parts.append(hidden.masked_fill(m == 0, -1e9).max(1).values)
            elif mode == "mean_tokens":
                parts.append((hidden * m).sum(1) / lengths)
            else:  # mean_sqrt_len_tokens
                parts.append((hidden * m).sum(1) / lengths.sqrt())
        out = torch.cat(parts, -1)
        return torch.nn.functional.normalize(out, p=2, dim=1) if self.normalize else out
