"""Images for LLaVA-style models, on the client: the vision tower and projector run here, on plain pixels.

The server bundle of a LLaVA model is only its language model. The client runs the model's own image processor,
vision tower and multi-modal projector (plain weights from its module shards), selects the feature layer exactly as
`LlavaModel.get_image_features` does, applies `p` to the projector's output and puts those rows at the image-token
positions of the embedded prompt: each image token of the prompt is expanded to one token per image feature, as
`LlavaProcessor` does. The server receives those rows in the secret basis only, like any other embedding. This
module needs the `stip[vision]` extra (torch, transformers, Pillow); callers reach it through
`stip.client.image_parts.check_vision`, which says so where it is missing.

Images come as PIL images, raw bytes, file paths or `data:` URLs (base64); chat messages may hold OpenAI-style
content parts (`{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`). An http(s) URL is
refused: nothing here fetches from the network.
"""

from __future__ import annotations

import base64
import binascii
import io
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from stip.client import hf
from stip.client.image_parts import (IMAGE_PART_TYPES, ImageInputError, check_takes_images,  # noqa: F401
                                     has_images)  # noqa: F401 - re-exported

MAX_IMAGE_BYTES = 20 * 1024**2
MAX_IMAGE_PIXELS = 50_000_000  # a decompression bomb is refused before it is decoded


def load_image(image):
    """A PIL image (RGB) from a PIL image, bytes, a path, or a base64 `data:` URL."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        raise ImageInputError("image URLs are not fetched: send the image inline as a base64 data URL "
                              "(data:image/png;base64,...)")
    if isinstance(image, str) and image.startswith("data:"):
        header, sep, data = image.partition(",")
        if not sep or not header.endswith(";base64") or not header[5:].startswith("image/"):
            raise ImageInputError("an image data URL must look like data:image/<type>;base64,<data>")
        try:
            image = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ImageInputError("the image data URL is not valid base64") from None
    elif isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageInputError(f"image file {path} does not exist")
        image = path.read_bytes()
    if not isinstance(image, (bytes, bytearray)):
        raise ImageInputError(f"an image must be a PIL image, bytes, a path or a data URL, not {type(image).__name__}")
    if len(image) > MAX_IMAGE_BYTES:
        raise ImageInputError(f"the image is {len(image)} bytes; at most {MAX_IMAGE_BYTES} are accepted")
    try:
        with Image.open(io.BytesIO(image)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ImageInputError(f"the image has {im.width}x{im.height} pixels; at most {MAX_IMAGE_PIXELS}")
            return im.convert("RGB")
    except (OSError, Image.DecompressionBombError) as e:
        raise ImageInputError(f"could not decode the image: {e}") from None


def image_part(image: str | Path | bytes) -> dict:
    """An OpenAI-style image content part (a base64 data URL) from an image file or encoded bytes; an image that
    does not decode is refused here, before any server contact."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise ImageInputError(f"image file {image} does not exist")
        image = Path(image).read_bytes()
    load_image(bytes(image))
    with Image.open(io.BytesIO(image)) as im:
        kind = (im.format or "png").lower()
    return {"type": "image_url",
            "image_url": {"url": f"data:image/{kind};base64,{base64.b64encode(image).decode()}"}}


def split_messages(messages: list[dict], image_token: str) -> tuple[list[dict], list]:
    """Chat messages with content parts -> (messages whose content is a string, the images in order). Each image part
    becomes the model's image token on its own line, where it stood; text parts are joined as they come."""
    out, images = [], []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            text = ""
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    text += part["text"]
                elif kind in IMAGE_PART_TYPES:
                    images.append(_part_image(part))
                    text += image_token + "\n"
                else:
                    raise ImageInputError(f"message content part of type {kind!r} is not supported "
                                          "(text and image_url only)")
            m = {**m, "content": text}
        out.append(m)
    return out, images


def extract_images(bundle, messages: list[dict] | None) -> tuple[list[dict] | None, list]:
    """(messages with string contents, their images) for a model that takes images; messages without image parts
    come back unchanged; image parts for a model that takes none are refused."""
    if not has_images(messages):
        return messages, []
    vision_tower(bundle)
    return split_messages(messages, image_token(bundle))


def _part_image(part: dict):
    value = part.get(part["type"])
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) and part["type"] == "image_url":
        raise ImageInputError("an image_url part needs image_url.url (a base64 data URL)")
    if isinstance(url, str) and not url.startswith("data:"):
        raise ImageInputError("image_url must be a base64 data URL (data:image/png;base64,...); the client does "
                              "not fetch URLs")
    return url


class VisionTower:
    """The model's image processor, vision tower and projector, built from the client bundle (plain weights)."""

    def __init__(self, bundle):
        from transformers import AutoImageProcessor, AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        self.config = config = hf.model_config(bundle)
        self.image_token_id = int(config.image_token_id)
        if not bundle.has_file("preprocessor_config.json"):
            raise ImageInputError(f"client bundle {bundle.path} has no preprocessor_config.json: protect a model "
                                  "folder that ships its image processor")
        # the model's config stands in for a hub folder's config.json (a processor file may not name its class)
        with bundle.signed_view() as signed_only:
            self.processor = AutoImageProcessor.from_pretrained(signed_only, config=config)
        module = torch.nn.Module()
        module.vision_tower = AutoModel.from_config(config.vision_config)
        module.multi_modal_projector = LlavaMultiModalProjector(config)
        module.load_state_dict(hf.module_state(bundle), strict=True)
        self.module = module.float().eval()
        self.resid = bundle.key.resid

    @torch.no_grad()
    def plain_features(self, images: list) -> torch.Tensor:
        """[images, features, d] projector outputs in the plain basis, as `LlavaModel.get_image_features` makes
        them (feature layer(s), the CLS token dropped by the "default" strategy)."""
        pixels = self.processor(images=[load_image(i) for i in images], return_tensors="pt")["pixel_values"]
        out = self.module.vision_tower(pixels.float(), output_hidden_states=True, return_dict=True)
        layer, strategy = self.config.vision_feature_layer, self.config.vision_feature_select_strategy
        layers = [layer] if isinstance(layer, int) else list(layer)
        pool = [out.hidden_states[i][:, 1:] if strategy == "default" else out.hidden_states[i] for i in layers]
        return self.module.multi_modal_projector(torch.cat(pool, dim=-1))

    def features(self, images: list) -> torch.Tensor:
        """[images, features, d] in the server's basis (`p` applied): what enters the language model."""
        return self.resid.apply(self.plain_features(images), -1, "out").contiguous()


_towers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def vision_tower(bundle) -> VisionTower:
    """The bundle's vision tower, built once per bundle; refuses bundles of models that take no images."""
    check_takes_images(bundle)
    with _lock:
        if bundle not in _towers:
            _towers[bundle] = VisionTower(bundle)
        return _towers[bundle]


def image_token(bundle) -> str:
    """The image token's text in the bundle's tokenizer (what a prompt writes where an image goes)."""
    return bundle.tokenizer.convert_ids_to_tokens(int(hf.model_config(bundle).image_token_id))


@dataclass
class VisionPrompt:
    """A prompt with its images: ids with each image token expanded to one per feature, and those features (in
    `p`, one row per expanded image token, in order)."""

    ids: list[int]
    features: torch.Tensor  # [image tokens, d]


def prepare(bundle, ids: list[int], images: list) -> VisionPrompt:
    """Expand each image token of `ids` (one per image, in order) to the image's features."""
    tower = vision_tower(bundle)
    slots = [i for i, t in enumerate(ids) if t == tower.image_token_id]
    if len(slots) != len(images):
        raise ImageInputError(f"the prompt has {len(slots)} image tokens for {len(images)} images; put one image "
                              f"token ({image_token(bundle)!r}) where each image goes")
    feats = tower.features(images)  # [n, f, d]
    out: list[int] = []
    last = 0
    for s in slots:
        out += ids[last:s] + [tower.image_token_id] * feats.shape[1]
        last = s + 1
    out += ids[last:]
    return VisionPrompt(out, feats.reshape(-1, feats.shape[-1]))


def embed(bundle, ids: list[int], features: torch.Tensor | None, noise=None) -> torch.Tensor:
    """The embedded context (from position 0) with the image features at the first image-token positions (the
    prompt's; an image token generated later is embedded as a token, as the plain model does). `noise`: the
    context's `ClientBundle.noise_chain()`, advanced over `ids`."""
    x = bundle.embed(torch.tensor(ids), start=0, noise=noise)
    if features is None or not len(features):
        return x
    slots = image_slots(bundle, ids, features)
    x = x.clone()
    x[slots] = features.to(x.dtype)
    return x


def image_slots(bundle, ids: list[int], features: torch.Tensor) -> torch.Tensor:
    """The positions that take the feature rows: the first len(features) image tokens of `ids`; refuses ids with
    fewer image tokens than rows (ids that `prepare` did not expand)."""
    if features.dim() != 2 or features.shape[1] != bundle.hidden_size:
        raise ImageInputError(f"image features must be [rows, {bundle.hidden_size}], not {list(features.shape)}")
    slots = (torch.tensor(ids) == int(hf.model_config(bundle).image_token_id)).nonzero().flatten()[:len(features)]
    if len(slots) != len(features):
        raise ImageInputError(f"{len(features)} image feature rows for {len(slots)} image tokens: pass the ids that "
                              "vision.prepare expanded")
    return slots
