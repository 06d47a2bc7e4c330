"""BERT-style encoders (BERT; RoBERTa reuses these tables): post-norm LayerNorm blocks, learned absolute positions,
no RoPE (Q/K get in-head permutations), GeLU FFN; one shot per request, no KV cache.

The client runs the whole embeddings module (token, position and token-type embeddings, then its LayerNorm) on plain
token ids and applies `p`; the server gets none of it and runs the encoder and the head. Which head is served is
the class the checkpoint's config names: the base model (hidden states, pooled by the client into sentence
embeddings), a sequence classifier (outputs in the secret label permutation) or a masked-LM head (outputs in `pc`,
its decoder untied from the embedding table the server never gets). A bare base model names its tensors without the
base prefix (`embeddings.…`, `encoder.layer.N.…`); the heads put it in front (`bert.…`), and so does the server
bundle, in the class's own names.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Callable

from stip.common.tasks import FEATURE_EXTRACTION, FILL_MASK, TEXT_CLASSIFICATION
from stip.common.architectures.rules import (CLIENT, DROP, LM_HEAD, TOKEN_EMBEDDING, Architecture, TensorRule,
                                             attention_geometry, linear, one, vec)
from stip.errors import UnsupportedModelError

E = r"encoder\.layer\.(?P<layer>\d+)\."

# The embeddings module goes to the client whole, as plain tensors (it applies `p` to the module's output).
EMBEDDING_RULES = (
    TensorRule(r"embeddings\.word_embeddings\.weight", {1: ("resid", "out")}, CLIENT, role=TOKEN_EMBEDDING,
               client_module="embeddings."),
    TensorRule(r"embeddings\.(position_embeddings|token_type_embeddings)\.weight|embeddings\.LayerNorm\."
               r"(weight|bias)", party=CLIENT, client_module="embeddings."),
    TensorRule(r"embeddings\.(position_ids|token_type_ids)", party=DROP),  # buffers older checkpoints store
)

ENCODER_RULES = (
    TensorRule(E + r"attention\.self\.query\.weight", linear("attn_q", "resid")),
    TensorRule(E + r"attention\.self\.key\.weight", linear("attn_k", "resid")),
    TensorRule(E + r"attention\.self\.value\.weight", linear("attn_v", "resid")),
    TensorRule(E + r"attention\.self\.query\.bias", vec("attn_q")),
    TensorRule(E + r"attention\.self\.key\.bias", vec("attn_k")),
    TensorRule(E + r"attention\.self\.value\.bias", vec("attn_v")),
    TensorRule(E + r"attention\.output\.dense\.weight", linear("resid", "attn_o")),
    TensorRule(E + r"attention\.output\.dense\.bias", vec("resid")),
    TensorRule(E + r"(attention\.output|output)\.LayerNorm\.(weight|bias)", vec("resid")),
    TensorRule(E + r"intermediate\.dense\.weight", linear("ffn", "resid")),
    TensorRule(E + r"intermediate\.dense\.bias", vec("ffn")),
    TensorRule(E + r"output\.dense\.weight", linear("resid", "ffn")),
    TensorRule(E + r"output\.dense\.bias", vec("resid")),
)

POOLER_RULES = (
    TensorRule(r"pooler\.dense\.weight", linear("resid", "resid")),
    TensorRule(r"pooler\.dense\.bias", vec("resid")),
)
DROP_POOLER = (TensorRule(r"pooler\.dense\.(weight|bias)", party=DROP),)  # heads built without the pooler

BERT_CLASSIFIER = (
    one("classifier.weight", linear("label", "resid"), in_base=False),
    one("classifier.bias", vec("label"), in_base=False),
)

BERT_MLM = (
    one("cls.predictions.transform.dense.weight", linear("resid", "resid"), in_base=False),
    one("cls.predictions.transform.dense.bias", vec("resid"), in_base=False),
    TensorRule(r"cls\.predictions\.transform\.LayerNorm\.(weight|bias)", vec("resid"), in_base=False),
    one("cls.predictions.decoder.weight", linear("vocab", "resid"), role=LM_HEAD, in_base=False),
    # the decoder's bias is `cls.predictions.bias` (tied); the untied server class holds it under both names
    one("cls.predictions.bias", vec("vocab"), in_base=False, copies=("cls.predictions.decoder.bias",)),
    one("cls.predictions.decoder.bias", {}, party=DROP, in_base=False),
    TensorRule(r"cls\.seq_relationship\.(weight|bias)", party=DROP, in_base=False),  # pre-training's NSP head
)


def encoder_family(model_types: tuple[str, ...], prefix: str, base: str, heads: dict[str, tuple[str, tuple, bool]],
                   embedding_rules: tuple = EMBEDDING_RULES, encoder_rules: tuple = ENCODER_RULES,
                   pooler_rules: tuple = POOLER_RULES, ffn_size: Callable[[Any], int] | None = None) -> Architecture:
    """One encoder family: `base` (the base model class, e.g. "BertModel") plus `heads` (class name -> (task,
    head rules, whether that class keeps the base model's pooler)); the table for a config is picked by the class
    its `architectures` names. `ffn_size(config)`: the FFN width where the config does not call it
    intermediate_size."""

    def cls_name(config) -> str:
        names = getattr(config, "architectures", None) or [base]
        if names[0] != base and names[0] not in heads:
            raise UnsupportedModelError(f"{model_types[0]} checkpoints are supported as {', '.join([base, *heads])}; "
                                        f"this one is a {names[0]}")
        return names[0]

    def task(config) -> str:
        name = cls_name(config)
        return FEATURE_EXTRACTION if name == base else heads[name][0]

    def geometry(config):
        name = cls_name(config)
        if task(config) == FILL_MASK and not getattr(config, "tie_word_embeddings", True):
            raise UnsupportedModelError(f"{name} with an untied decoder is not supported")
        labels = int(config.num_labels) if task(config) == TEXT_CLASSIFICATION else 0
        return attention_geometry(config, rope=False, labels=labels,
                                  ffn=None if ffn_size is None else ffn_size(config))

    def table(rules: tuple, base_prefix: str, renames: tuple = ()) -> Architecture:
        return Architecture(model_types=model_types, base_prefix=base_prefix, rules=rules, geometry=geometry,
                            rope=False, task=task, server_class=cls_name, renames=renames)

    # a base model saved under the heads' prefix (`bert.embeddings.…`) is read too; the bundle drops the prefix
    bare = table(embedding_rules + encoder_rules + pooler_rules, "", ((f"^{re.escape(prefix)}", ""),))
    tables = {base: bare}
    for name, (_, head_rules, keeps_pooler) in heads.items():
        pooler = pooler_rules if keeps_pooler else tuple(replace(r, party=DROP, axes={}) for r in pooler_rules)
        tables[name] = table(embedding_rules + encoder_rules + pooler + head_rules, prefix)
    return replace(bare, variant=lambda config: tables[cls_name(config)])


BERT = encoder_family(("bert",), "bert.", "BertModel", {
    "BertForSequenceClassification": (TEXT_CLASSIFICATION, BERT_CLASSIFIER, True),  # it reads the pooler
    "BertForMaskedLM": (FILL_MASK, BERT_MLM, False),
})
