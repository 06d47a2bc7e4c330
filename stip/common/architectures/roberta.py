"""RoBERTa: BERT's encoder under the `roberta.` prefix (`stip.common.architectures.bert`), with its own heads: a
classifier with a dense layer of its own on the first token, and an MLM head `lm_head.…` whose decoder is tied to the
token embedding. Its client-side embeddings number positions from the padding index, as transformers' own module
does."""

from stip.common.tasks import FILL_MASK, TEXT_CLASSIFICATION
from stip.common.architectures.bert import encoder_family
from stip.common.architectures.rules import DROP, LM_HEAD, TensorRule, linear, one, vec

ROBERTA_CLASSIFIER = (
    one("classifier.dense.weight", linear("resid", "resid"), in_base=False),
    one("classifier.dense.bias", vec("resid"), in_base=False),
    one("classifier.out_proj.weight", linear("label", "resid"), in_base=False),
    one("classifier.out_proj.bias", vec("label"), in_base=False),
)

ROBERTA_MLM = (
    one("lm_head.dense.weight", linear("resid", "resid"), in_base=False),
    one("lm_head.dense.bias", vec("resid"), in_base=False),
    TensorRule(r"lm_head\.layer_norm\.(weight|bias)", vec("resid"), in_base=False),
    one("lm_head.decoder.weight", linear("vocab", "resid"), role=LM_HEAD, in_base=False),
    one("lm_head.bias", vec("vocab"), in_base=False, copies=("lm_head.decoder.bias",)),  # tied, as in BERT
    one("lm_head.decoder.bias", {}, party=DROP, in_base=False),
)

ROBERTA = encoder_family(("roberta",), "roberta.", "RobertaModel", {
    "RobertaForSequenceClassification": (TEXT_CLASSIFICATION, ROBERTA_CLASSIFIER, False),
    "RobertaForMaskedLM": (FILL_MASK, ROBERTA_MLM, False),
})
