"""Image inputs before the vision tower: whether chat messages carry images (OpenAI-style image content parts),
whether the bundle takes them, and whether this install can run them. Checked on every generation and in the proxy,
so it lives apart from `stip.client.vision`, whose image processor and vision tower need torch, transformers and
Pillow: the `stip[vision]` extra, which the light client (`pip install stip`) does not have. A light install answers
an image for a model that takes images with `ImageInputError` naming that extra (the proxy: a 400), not an
ImportError from deep inside: callers run `check_vision` before they import `stip.client.vision`."""

from __future__ import annotations

import importlib.util

from stip.common.tasks import IMAGE_TEXT_TO_TEXT
from stip.errors import StipError

IMAGE_PART_TYPES = ("image_url", "image")  # OpenAI's chat content part; a bare {"type": "image", "image": ...}
VISION_EXTRA = 'pip install "stip[vision]"'
VISION_PACKAGES = {"torch": "torch", "transformers": "transformers", "PIL": "Pillow"}  # module -> distribution


class ImageInputError(StipError, ValueError):
    """An image the client cannot use: bad encoding, a remote URL, a model that takes no images, or an install
    without the vision extra."""


def has_images(messages: list[dict] | None) -> bool:
    return any(isinstance(m.get("content"), list) and any(isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES
                                                          for p in m["content"]) for m in messages or ())


def missing_vision_packages() -> list[str]:
    """The distributions of the vision extra this Python lacks (none in the full install)."""
    return [dist for module, dist in VISION_PACKAGES.items() if importlib.util.find_spec(module) is None]


def require_vision(what: str = "image input") -> None:
    """Refuse `what` where the vision extra is not installed, naming the install that adds it."""
    missing = missing_vision_packages()
    if missing:
        raise ImageInputError(f"{what} requires the vision extra ({', '.join(missing)} not installed here; the "
                              f"light client runs text only): {VISION_EXTRA}")


def check_takes_images(bundle) -> None:
    """A LLaVA-style bundle in round-trip mode; anything else refuses images (before any install check: a model that
    takes no images takes none in any install)."""
    if bundle.task != IMAGE_TEXT_TO_TEXT:
        raise ImageInputError(f"this model ({bundle.task}) takes no images")
    if bundle.mode != "round-trip":
        raise ImageInputError(f"a {bundle.mode} bundle takes token ids only, not images")


def check_vision(bundle) -> None:
    """Before `stip.client.vision` is imported: the bundle takes images and this install can run them."""
    check_takes_images(bundle)
    require_vision()
