"""The client's half of a text encoder (BERT, RoBERTa, DistilBERT): text in; sentence embeddings, labels or masked
tokens out, in numpy (the light client runs it too).

The client tokenizes with padding (`LightTokenizer.batch`, as transformers pads), computes the model's embeddings
module (token, position and token-type embeddings, then its LayerNorm, as transformers' `BertEmbeddings`,
`RobertaEmbeddings` and DistilBERT's `Embeddings` compute them, in float32, from the bundle's module shard, memory-
mapped) and applies `p`; it sends that and the padding mask to `/v1/encode` in one request, and un-permutes the
reply: hidden states with `p`, a classifier's logits with the label permutation, a masked-LM head's with `pc`.
Sentence embeddings are pooled here, as the model's sentence-transformers configuration says (copied into the client
bundle by `stip protect`; mean pooling where there is none). Results are numpy arrays; a caller that hands in torch
tensors (a tokenized batch, hidden states to pool) gets torch tensors back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np

from stip.client.bundle import ClientBundle
from stip.client.errors import TaskError  # noqa: F401 - re-exported
from stip.client.tables import map_tensors, rows_float32
from stip.common.arrays import like, to_numpy
from stip.common.bundles.manifest import listed_files
from stip.common.layout import CLIENT_MODULE_DIR
from stip.common.tasks import FEATURE_EXTRACTION, FILL_MASK, TEXT_CLASSIFICATION
from stip.errors import BundleError, StipError

BATCH = 32  # sequences per request (the server takes at most 64)


@dataclass(frozen=True)
class Module:
    """A family's client-side embeddings module: whether it adds token-type embeddings, how it numbers positions,
    its LayerNorm's epsilon, and the longest input its positions allow."""

    token_types: bool = True
    roberta_positions: bool = False  # RoBERTa numbers real tokens from padding_idx + 1, padding at padding_idx
    eps: Callable = lambda c: float(c.get("layer_norm_eps", 1e-12))
    max_tokens: Callable = lambda c: int(c["max_position_embeddings"])

    def names(self) -> set[str]:
        """The tensors the module holds (its state dict in transformers)."""
        names = {"word_embeddings.weight", "position_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias"}
        return names | {"token_type_embeddings.weight"} if self.token_types else names


MODULES = {
    "bert": Module(),
    "roberta": Module(roberta_positions=True,
                      max_tokens=lambda c: int(c["max_position_embeddings"]) - int(c["pad_token_id"]) - 1),
    "distilbert": Module(token_types=False, eps=lambda c: 1e-12),  # DistilBERT's LayerNorm has a fixed epsilon
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
        self.config = bundle.model_config
        spec = MODULES.get(self.config.get("model_type"))
        if spec is None:
            raise BundleError(f"no client-side text module for {self.config.get('model_type')!r} models; families: "
                              f"{', '.join(MODULES)}")
        self.spec = spec
        self.max_tokens = spec.max_tokens(self.config)
        sbert = bundle.path / "sentence_bert_config.json"  # sentence-transformers truncates at its max_seq_length
        if bundle.has_file(sbert.name):
            limit = json.loads(sbert.read_text()).get("max_seq_length")
            if isinstance(limit, int) and limit > 0:
                self.max_tokens = min(self.max_tokens, limit)

    @cached_property
    def module(self) -> dict[str, tuple[np.ndarray, str]]:
        """The embeddings module's tensors from the bundle's module shards (mapped, in their own dtype): exactly
        the module's, as transformers' strict loading would ask."""
        state: dict = {}
        for shard in listed_files(self.bundle.manifest, CLIENT_MODULE_DIR + "/", ".safetensors"):
            state |= map_tensors(self.bundle.path / shard)
        want = self.spec.names()
        missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
        if missing or unexpected:
            raise BundleError(f"client bundle {self.bundle.path}: the embeddings module "
                              f"{'lacks ' + repr(missing[0]) if missing else 'has unexpected ' + repr(unexpected[0])}")
        return state

    def _rows(self, name: str, index: np.ndarray) -> np.ndarray:
        table, dtype = self.module[name + ".weight"]
        return rows_float32(table, dtype, index)

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or not texts:
            raise ValueError("texts must be a non-empty list of strings")
        return self.bundle.tokenizer.batch(list(texts), self.max_tokens)

    def plain_embeddings(self, ids: np.ndarray, token_types: np.ndarray | None = None) -> np.ndarray:
        """The embeddings module's output [B, T, d] in float32, in the order transformers adds the parts."""
        spec = self.spec
        if spec.roberta_positions:  # create_position_ids_from_input_ids
            pad = int(self.config["pad_token_id"])
            real = (ids != pad).astype(np.int64)
            positions = np.cumsum(real, axis=1) * real + pad
        else:
            positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
        x = self._rows("word_embeddings", ids)
        if spec.token_types:
            x = x + self._rows("token_type_embeddings", np.zeros_like(ids) if token_types is None else token_types)
        x = x + self._rows("position_embeddings", positions)
        mean = x.mean(-1, keepdims=True)
        centred = x - mean
        var = (centred * centred).mean(-1, keepdims=True)
        w, b = (rows_float32(*self.module[f"LayerNorm.{n}"], slice(None)) for n in ("weight", "bias"))
        return (centred / np.sqrt(var + np.float32(spec.eps(self.config)))) * w + b

    def protected_embeddings(self, batch: dict):
        """The module's output for a tokenized batch, in the server's secret basis: all the server ever gets (torch
        if the batch's ids are torch tensors)."""
        ids = batch["input_ids"]
        types = batch.get("token_type_ids")
        x = self.plain_embeddings(to_numpy(ids).astype(np.int64), None if types is None else to_numpy(types))
        return like(np.ascontiguousarray(self.bundle.key.resid.apply(x, -1, "out")), ids)

    def _run(self, batch: dict) -> np.ndarray:
        """One request: the server's reply, un-permuted."""
        mask = to_numpy(batch["attention_mask"])
        b, t = mask.shape
        x = to_numpy(self.protected_embeddings(batch))
        key, task = self.bundle.key, self.bundle.task
        if task == FEATURE_EXTRACTION:
            return key.resid.invert(self.connection.encode(x, mask, reply_shape=[b, t, x.shape[-1]]), -1)
        if task == FILL_MASK:
            return key.vocab.invert(self.connection.encode(x, mask, reply_shape=[b, t, self.bundle.vocab_size]), -1)
        return key.labels.invert(self.connection.encode(x, mask, reply_shape=[b, len(key.labels)]), -1)

    def hidden_states(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The last hidden states [B, T, d] (padded to the longest text) and the attention mask [B, T]."""
        require_task(self.bundle, FEATURE_EXTRACTION, what="hidden states")
        batch = self.tokenize(list(texts))
        return self._batched(batch), batch["attention_mask"]

    def _batched(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        n = batch["input_ids"].shape[0]
        parts = []
        for i in range(0, n, self.batch_size):
            sub = {k: v[i:i + self.batch_size] for k, v in batch.items()}
            if self.bundle.tokenizer.padding_side == "right":  # trim the padding this slice does not need
                longest = int(sub["attention_mask"].sum(1).max())
                sub = {k: v[:, :longest] for k, v in sub.items()}
            parts.append(self._run(sub))
        if parts and parts[0].ndim == 3:  # pad slices back to the batch's common length
            t = batch["input_ids"].shape[1]
            parts = [np.pad(p, ((0, 0), (0, t - p.shape[1]), (0, 0))) for p in parts]
        return np.concatenate(parts)

    def embed(self, texts: list[str]) -> np.ndarray:
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
        if self.config.get("problem_type") == "multi_label_classification":
            scores = 1 / (1 + np.exp(-logits))
        else:
            scores = softmax(logits)
        return top_labels(scores, self.config.get("id2label"), top_k)

    def fill_mask(self, text: str, top_k: int = 5) -> list[dict]:
        """The `top_k` tokens for the tokenizer's mask token in `text` (exactly one), best first."""
        require_task(self.bundle, FILL_MASK, what="fill-mask")
        tok = self.bundle.tokenizer
        if not isinstance(text, str):
            raise ValueError("fill_mask takes one string")
        batch = self.tokenize([text])
        ids = batch["input_ids"][0]
        where = np.flatnonzero(ids == tok.mask_token_id).tolist()
        if len(where) != 1:
            raise ValueError(f"the text must hold the mask token {getattr(tok, 'mask_token', None)!r} exactly once; "
                             f"it holds it {len(where)} times")
        probs = softmax(self._run(batch)[0, where[0]])
        out = []
        for token in top_indices(probs, top_k):
            filled = ids.copy()
            filled[where[0]] = token
            out.append({"score": float(probs[token]), "token": int(token),
                        "token_str": tok.decode([token], clean_up_tokenization_spaces=None),
                        "sequence": tok.decode(filled, skip_special_tokens=True, clean_up_tokenization_spaces=None)})
        return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def top_indices(scores: np.ndarray, k: int) -> list[int]:
    """The `k` best of a vector, best first (ties: the lower index first)."""
    k = max(1, min(int(k), scores.shape[-1]))
    return np.argsort(-scores, kind="stable")[:k].tolist()


def top_labels(scores, id2label: dict | None, top_k: int) -> list[list[dict]]:
    """[B, L] scores -> per row the top_k {"label", "score"}, best first (labels named by the config's id2label)."""
    scores = to_numpy(scores, np.float32)
    names = {int(i): str(n) for i, n in (id2label or {}).items()}
    return [[{"label": names.get(i, f"LABEL_{i}"), "score": float(row[i])} for i in top_indices(row, top_k)]
            for row in scores]


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

    def pool(self, hidden, mask):
        """[B, T, d] hidden states and their [B, T] mask -> [B, d * modes] (numpy, or torch as `hidden` is)."""
        h = to_numpy(hidden, np.float32)
        m = to_numpy(mask)[..., None].astype(np.float32)
        lengths = np.maximum(m.sum(1), np.float32(1e-9))
        parts = []
        for mode in self.modes:
            if mode == "cls_token":
                parts.append(h[:, 0])
            elif mode == "max_tokens":
                parts.append(np.where(m == 0, np.float32(-1e9), h).max(1))
            elif mode == "mean_tokens":
                parts.append((h * m).sum(1) / lengths)
            else:  # mean_sqrt_len_tokens
                parts.append((h * m).sum(1) / np.sqrt(lengths))
        out = np.concatenate(parts, -1)
        if self.normalize:  # torch.nn.functional.normalize: x / max(||x||, eps)
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), np.float32(1e-12))
        return like(out.astype(np.float32), hidden)
