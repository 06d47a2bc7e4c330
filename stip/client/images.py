"""The client's half of image classification (ViT): pixels in, labels out; the server sees neither.

Images are read as for LLaVA (`stip.client.vision.load_image`: PIL images, files, bytes or base64 data URLs, within
its size limits). The client runs the model's own image processor (its `preprocessor_config.json`, copied into the
client bundle) and the model's own embeddings module (patch projection, CLS token, position embeddings: plain tensors
from the bundle's module shards), applies `p`, and sends the patch sequence to `/v1/encode` with no mask. The server
returns the classifier's logits in the secret label order; the client un-permutes them and names the top labels
from the config's `id2label`.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch

from stip.client import hf
from stip.client.bundle import ClientBundle
from stip.client.vision import ImageInputError, load_image
from stip.common.layout import MODEL_CONFIG_FILE
from stip.common.tasks import IMAGE_CLASSIFICATION
from stip.errors import BundleError

# model_type -> (transformers module, class) of the client-side embeddings module, built from the model's config
EMBEDDINGS = {"vit": ("transformers.models.vit.modeling_vit", "ViTEmbeddings")}
PROCESSOR_FILE = "preprocessor_config.json"

ImageInput = Any  # a PIL image, a path to an image file, encoded image bytes, or a `data:image/...;base64,` URL


class ImageEncoder:
    """The image processor and the embeddings module of one client bundle, built once (`for_bundle`)."""

    _cache: "weakref.WeakKeyDictionary[ClientBundle, ImageEncoder]" = weakref.WeakKeyDictionary()

    def __init__(self, bundle: ClientBundle):
        import importlib

        from transformers import AutoImageProcessor

        if bundle.task != IMAGE_CLASSIFICATION:
            raise BundleError(f"client bundle {bundle.path} serves {bundle.task}, not {IMAGE_CLASSIFICATION}: "
                              "it takes no images")
        config = hf.model_config(bundle)
        if config.model_type not in EMBEDDINGS:
            raise BundleError(f"no client-side image embeddings for model type {config.model_type!r}")
        if not bundle.has_file(PROCESSOR_FILE):
            raise BundleError(f"client bundle {bundle.path} has no {PROCESSOR_FILE}: protect a model folder "
                              "that ships its image processor")
        module, name = EMBEDDINGS[config.model_type]
        cls = getattr(importlib.import_module(module), name)
        self.bundle = bundle
        # the model's config stands in for the config.json a hub folder has (a processor file may not name its class)
        with bundle.signed_view() as signed_only:
            self.processor = AutoImageProcessor.from_pretrained(signed_only, config=config)
        self.embeddings = cls(config).eval()
        state = hf.module_state(bundle)
        missing, unexpected = self.embeddings.load_state_dict(state, strict=False)
        # the module's optional mask token is unused for classification; anything else missing is a broken bundle
        missing = [m for m in missing if m != "mask_token"]
        if missing or unexpected:
            raise BundleError(f"client bundle {bundle.path}: the embeddings module's tensors do not match "
                              f"{MODEL_CONFIG_FILE} (missing {missing}, unexpected {unexpected})")
        names = getattr(config, "id2label", None) or {}
        self.labels = [str(names.get(i, names.get(str(i), f"LABEL_{i}"))) for i in range(config.num_labels)]

    @classmethod
    def for_bundle(cls, bundle: ClientBundle) -> "ImageEncoder":
        enc = cls._cache.get(bundle)
        if enc is None:
            enc = cls._cache[bundle] = cls(bundle)
        return enc

    def pixels(self, images: Iterable[ImageInput]) -> torch.Tensor:
        """The model's own preprocessing: [B, C, H, W]."""
        loaded = []
        for i, im in enumerate(images):
            try:
                loaded.append(load_image(im))
            except ImageInputError as e:
                raise ImageInputError(f"image {i}: {e}") from None
        if not loaded:
            raise ImageInputError("no images given")
        return self.processor(images=loaded, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def embed(self, images: Iterable[ImageInput]) -> torch.Tensor:
        """The patch sequence (CLS first, positions added) in the server's basis: [B, 1 + patches, d]."""
        pixels = self.pixels(images)
        weight = next(self.embeddings.parameters())
        try:
            x = self.embeddings(pixels.to(weight.dtype))
        except ValueError as e:  # the processor's size and the model's image_size disagree
            raise BundleError(f"client bundle {self.bundle.path}: {e}") from None
        return self.bundle.key.resid.apply(x.float(), -1, "out").contiguous()

    def plain_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits in the model's label order, from the server's secret order (last axis)."""
        if self.bundle.key.labels is None:
            raise BundleError(f"client bundle {self.bundle.path} has no label permutation")
        return self.bundle.key.labels.invert(logits.float(), -1)

    def top_labels(self, logits: torch.Tensor, top_k: int = 1) -> list[list[dict]]:
        """[{"label", "score"}] per image, best first; scores are softmax probabilities (as HF's pipeline)."""
        probs = self.plain_logits(logits).softmax(-1)
        k = max(1, min(int(top_k), probs.shape[-1]))
        scores, ids = probs.topk(k, dim=-1)
        return [[{"label": self.labels[int(i)], "score": float(s)} for s, i in zip(row_s, row_i)]
                for row_s, row_i in zip(scores, ids)]


def classify_images(bundle: ClientBundle, connection, images: Iterable[ImageInput], top_k: int = 1) -> list[list[dict]]:
    """Classify `images` through the server at `connection` (a `stip.client.transport.Connection`)."""
    enc = ImageEncoder.for_bundle(bundle)
    x = enc.embed(images)
    # no mask: every image is the same number of patches; a reply of any other shape is refused unread
    logits = connection.encode(x, None, reply_shape=[x.shape[0], len(enc.labels)])
    return enc.top_labels(logits, top_k)
