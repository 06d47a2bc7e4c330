"""ViT image classification (`ViTForImageClassification`): LayerNorm pre-norm blocks, no RoPE (Q/K get in-head
permutations), GeLU MLP, a classifier on the CLS token whose outputs are permuted by the label permutation.

The client runs the model's own image processor and the whole embeddings module (patch projection, CLS token,
position embeddings) on plain pixels, then applies `p`; the server gets no embedding tensor at all and runs the
blocks, the final LayerNorm and the classifier on the patch sequence it receives. Checkpoints name the blocks as
`save_pretrained` writes them (`encoder.layer.N.attention.attention.query.…`); transformers renames them on load to
the class's own names (`layers.N.attention.q_proj.…`), and so do the `renames` below: the server bundle holds the
class's names.
"""

from stip.common.keys import Geometry
from stip.common.tasks import IMAGE_CLASSIFICATION
from stip.common.architectures.rules import CLIENT, Architecture, TensorRule, linear, one, vec
from stip.errors import UnsupportedModelError

CLASSIFIER_CLASS = "ViTForImageClassification"


def _task(config) -> str:
    names = getattr(config, "architectures", None) or [CLASSIFIER_CLASS]
    if names[0] != CLASSIFIER_CLASS:
        raise UnsupportedModelError(f"ViT checkpoints are supported as {CLASSIFIER_CLASS}; this one is a "
                                    f"{names[0]}")
    return IMAGE_CLASSIFICATION


def _geometry(config) -> Geometry:
    _task(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if not config.num_labels:
        raise UnsupportedModelError("a ViT classifier with no labels (num_labels = 0) has nothing to protect")
    # no vocabulary: the client key's `pc` is empty; the classifier's outputs get the label permutation instead
    return Geometry(hidden=config.hidden_size, vocab=0, layers=config.num_hidden_layers, heads=heads,
                    kv_heads=heads, head_dim=head_dim, ffn=config.intermediate_size, rope=False,
                    labels=config.num_labels)


L = r"layers\.(?P<layer>\d+)\."

VIT = Architecture(
    model_types=("vit",),
    base_prefix="vit.",
    renames=(
        (r"^encoder\.layer\.(\d+)\.", r"layers.\1."),
        (r"^(layers\.\d+\.attention\.)attention\.query\.", r"\1q_proj."),
        (r"^(layers\.\d+\.attention\.)attention\.key\.", r"\1k_proj."),
        (r"^(layers\.\d+\.attention\.)attention\.value\.", r"\1v_proj."),
        (r"^(layers\.\d+\.attention\.)output\.dense\.", r"\1o_proj."),
        (r"^(layers\.\d+\.)intermediate\.dense\.", r"\1mlp.fc1."),
        (r"^(layers\.\d+\.)output\.dense\.", r"\1mlp.fc2."),
    ),
    rules=(
        TensorRule(r"embeddings\.(cls_token|mask_token|position_embeddings|patch_embeddings\.projection\."
                   r"(weight|bias))", party=CLIENT, client_module="embeddings."),
        TensorRule(L + r"attention\.q_proj\.weight", linear("attn_q", "resid")),
        TensorRule(L + r"attention\.k_proj\.weight", linear("attn_k", "resid")),
        TensorRule(L + r"attention\.v_proj\.weight", linear("attn_v", "resid")),
        TensorRule(L + r"attention\.q_proj\.bias", vec("attn_q")),
        TensorRule(L + r"attention\.k_proj\.bias", vec("attn_k")),
        TensorRule(L + r"attention\.v_proj\.bias", vec("attn_v")),
        TensorRule(L + r"attention\.o_proj\.weight", linear("resid", "attn_o")),
        TensorRule(L + r"attention\.o_proj\.bias", vec("resid")),
        TensorRule(L + r"layernorm_(before|after)\.(weight|bias)", vec("resid")),
        TensorRule(L + r"mlp\.fc1\.weight", linear("ffn", "resid")),
        TensorRule(L + r"mlp\.fc1\.bias", vec("ffn")),
        TensorRule(L + r"mlp\.fc2\.weight", linear("resid", "ffn")),
        TensorRule(L + r"mlp\.fc2\.bias", vec("resid")),
        TensorRule(r"layernorm\.(weight|bias)", vec("resid")),
        one("classifier.weight", linear("label", "resid"), in_base=False),
        one("classifier.bias", vec("label"), in_base=False),
    ),
    geometry=_geometry,
    rope=False,
    task=_task,
    server_class=lambda config: CLASSIFIER_CLASS,
)
