"""DistilBERT: BERT's embeddings (no token types) and post-norm blocks under its own names (`transformer.layer.N.`,
`q_lin`/`k_lin`/`v_lin`/`out_lin`, `ffn.lin1`/`lin2`), no pooler; heads `pre_classifier` + `classifier`, and an MLM
head whose `vocab_projector` is tied to the token embedding. The tables are built as BERT's
(`stip.common.architectures.bert`)."""

from stip.common.tasks import FILL_MASK, TEXT_CLASSIFICATION
from stip.common.architectures.bert import EMBEDDING_RULES, encoder_family
from stip.common.architectures.rules import LM_HEAD, TensorRule, linear, one, vec

L = r"transformer\.layer\.(?P<layer>\d+)\."

DISTILBERT_BLOCKS = (
    TensorRule(L + r"attention\.q_lin\.weight", linear("attn_q", "resid")),
    TensorRule(L + r"attention\.k_lin\.weight", linear("attn_k", "resid")),
    TensorRule(L + r"attention\.v_lin\.weight", linear("attn_v", "resid")),
    TensorRule(L + r"attention\.q_lin\.bias", vec("attn_q")),
    TensorRule(L + r"attention\.k_lin\.bias", vec("attn_k")),
    TensorRule(L + r"attention\.v_lin\.bias", vec("attn_v")),
    TensorRule(L + r"attention\.out_lin\.weight", linear("resid", "attn_o")),
    TensorRule(L + r"attention\.out_lin\.bias", vec("resid")),
    TensorRule(L + r"(sa|output)_layer_norm\.(weight|bias)", vec("resid")),
    TensorRule(L + r"ffn\.lin1\.weight", linear("ffn", "resid")),
    TensorRule(L + r"ffn\.lin1\.bias", vec("ffn")),
    TensorRule(L + r"ffn\.lin2\.weight", linear("resid", "ffn")),
    TensorRule(L + r"ffn\.lin2\.bias", vec("resid")),
)

DISTILBERT_CLASSIFIER = (
    one("pre_classifier.weight", linear("resid", "resid"), in_base=False),
    one("pre_classifier.bias", vec("resid"), in_base=False),
    one("classifier.weight", linear("label", "resid"), in_base=False),
    one("classifier.bias", vec("label"), in_base=False),
)

DISTILBERT_MLM = (
    one("vocab_transform.weight", linear("resid", "resid"), in_base=False),
    one("vocab_transform.bias", vec("resid"), in_base=False),
    TensorRule(r"vocab_layer_norm\.(weight|bias)", vec("resid"), in_base=False),
    one("vocab_projector.weight", linear("vocab", "resid"), role=LM_HEAD, in_base=False),
    one("vocab_projector.bias", vec("vocab"), in_base=False),
)

DISTILBERT = encoder_family(("distilbert",), "distilbert.", "DistilBertModel", {
    "DistilBertForSequenceClassification": (TEXT_CLASSIFICATION, DISTILBERT_CLASSIFIER, False),
    "DistilBertForMaskedLM": (FILL_MASK, DISTILBERT_MLM, False),
}, embedding_rules=EMBEDDING_RULES, encoder_rules=DISTILBERT_BLOCKS, pooler_rules=(),
    ffn_size=lambda c: int(c.hidden_dim))
