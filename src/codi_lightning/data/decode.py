"""Safe decoding of WebDataset samples: images, text and json only.

WebDataset's default decoders unpickle ``.pyd``/``.pickle`` and ``torch.load`` ``.pth``
members, so a shard from a stranger could run code. Here members with any other
extension are never even read from the tar (``select_member``), and nothing is ever
unpickled.
"""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TARGET_KEYS = IMAGE_EXTS
COND_KEYS = tuple(f"cond.{e}" for e in IMAGE_EXTS)
TEXT_KEYS = ("txt",)
JSON_KEYS = ("json",)
ALLOWED = set(TARGET_KEYS) | set(COND_KEYS) | set(TEXT_KEYS) | set(JSON_KEYS)


class BadSample(ValueError):
    """A sample that cannot be used; ``reason`` names why (for skip counts)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def member_extension(name: str) -> str:
    """``dir/key.cond.png`` -> ``cond.png`` (WebDataset: the key ends at the first dot
    of the base name)."""
    base = name.rsplit("/", 1)[-1]
    return base.split(".", 1)[1].lower() if "." in base else ""


def select_member(name: str) -> bool:
    """Read only members whose extension we decode."""
    return member_extension(name) in ALLOWED


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> RGB PIL image (any mode converted; 16-bit scaled to 8-bit)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        background = Image.new("RGB", img.size, (255, 255, 255))
        rgba = img.convert("RGBA")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Raw WebDataset sample -> ``{"key", "image", "cond" (or None), "caption", "meta"}``."""
    key = sample.get("__key__", "?")
    target = next((sample[k] for k in TARGET_KEYS if k in sample), None)
    if target is None:
        raise BadSample("no_target", f"sample {key!r} has none of {TARGET_KEYS}")
    try:
        image = decode_image(target)
    except Exception as err:  # PIL raises many types for corrupt data
        raise BadSample("corrupt_image", f"{key}: {err}") from err
    cond = None
    raw_cond = next((sample[k] for k in COND_KEYS if k in sample), None)
    if raw_cond is not None:
        try:
            cond = decode_image(raw_cond)
        except Exception as err:
            raise BadSample("corrupt_condition", f"{key}: {err}") from err
    caption = sample["txt"].decode("utf-8", errors="replace") if "txt" in sample else ""
    meta: dict[str, Any] = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"].decode("utf-8", errors="replace"))
        except ValueError:
            meta = {}
    return {"key": key, "image": image, "cond": cond, "caption": caption.strip(), "meta": meta}
