"""Whether chat messages carry images (OpenAI-style image content parts): checked on every generation, so it lives
apart from `stip.client.vision`, whose vision tower needs torch and transformers (the full install)."""

from __future__ import annotations

IMAGE_PART_TYPES = ("image_url", "image")  # OpenAI's chat content part; a bare {"type": "image", "image": ...}


def has_images(messages: list[dict] | None) -> bool:
    return any(isinstance(m.get("content"), list) and any(isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES
                                                          for p in m["content"]) for m in messages or ())
