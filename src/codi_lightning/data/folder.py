"""A folder of condition images for ``codi-lightning predict``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from .decode import DEFAULT_MAX_PIXELS, IMAGE_EXTS, BadSample, image_error, open_image, to_rgb
from .transforms import to_tensor01


class ConditionFolder(Dataset):
    """Condition images (recursively) with optional prompts.

    Each image is scaled by ``upscale`` (bicubic; e.g. 4 for 4x super-resolution, whose
    condition enters at the output resolution) and then to the nearest multiple of
    ``multiple`` on each side. The prompt is the side file ``<stem>.txt`` if present,
    else ``prompt``.

    A file that cannot be used (truncated, not an image, more than ``max_pixels`` pixels,
    unreadable) does not raise: its item is ``{"name": ..., "error": <short reason>}``,
    which ``collate_conditions`` moves to ``batch["skipped"]``, so one bad file does not
    stop a run and is still named in the output.

    Args:
        root: the folder (searched recursively; jpg, jpeg, png, webp).
        prompt: prompt of the images without a side ``<stem>.txt``.
        upscale: scale factor applied to each image.
        multiple: each side is resized to a multiple of this.
        max_pixels: skip images with more pixels than this (checked from the header,
            before decoding); default ``DEFAULT_MAX_PIXELS``.
    """

    def __init__(
        self, root: str, prompt: str = "", upscale: int = 1, multiple: int = 64,
        max_pixels: int | None = None,
    ) -> None:  # fmt: skip
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.predict_images={root!r} is not a folder")
        self.files = sorted(
            p for p in self.root.rglob("*")
            if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS
        )  # fmt: skip
        if not self.files:
            raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTS)} images under {root!r}")
        self.prompt, self.upscale, self.multiple = prompt, upscale, multiple
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``{"cond", "caption", "name"}``, or ``{"name", "error"}`` for a bad file."""
        path = self.files[index]
        name = str(path.relative_to(self.root).with_suffix(""))
        try:
            data = path.read_bytes()
        except OSError as err:
            return {"name": name, "error": f"unreadable file ({err.strerror or err})"}
        try:
            image = self._load(data)
        except BadSample as err:
            return {"name": name, "error": err.detail}
        except Exception as err:  # PIL raises many types for truncated or corrupt data
            return {"name": name, "error": f"not a readable image ({image_error(err)})"}
        side = path.with_suffix(".txt")
        try:
            prompt = (
                side.read_text(encoding="utf-8", errors="replace").strip()
                if side.is_file()
                else self.prompt
            )
        except OSError as err:
            return {"name": name, "error": f"unreadable prompt file {side.name} ({err.strerror})"}
        return {"cond": to_tensor01(image), "caption": prompt, "name": name}

    def _load(self, data: bytes) -> Image.Image:
        """Decode (after the ``max_pixels`` check) and resize."""
        image = to_rgb(open_image(data, self.max_pixels))
        w, h = image.size
        m = self.multiple
        size = (max(m, round(w * self.upscale / m) * m), max(m, round(h * self.upscale / m) * m))
        if size != image.size:
            image = image.resize(size, Image.BICUBIC)
        return image


def collate_conditions(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the good samples (``cond``, ``caption``, ``name``); the bad ones (with an
    ``error``) go to ``skipped``: ``[{"name", "reason"}, ...]``, always present. A batch
    without any good sample has ``cond`` None and empty ``caption`` and ``name``."""
    good = [s for s in samples if "error" not in s]
    skipped = [{"name": s["name"], "reason": s["error"]} for s in samples if "error" in s]
    if not good:
        return {"cond": None, "caption": [], "name": [], "skipped": skipped}
    sizes = {tuple(s["cond"].shape) for s in good}
    if len(sizes) > 1:
        raise ValueError(
            f"predict images of different sizes in one batch ({sorted(sizes)}): set "
            "data.predict_batch_size=1 or give images of one size"
        )
    return {
        "cond": torch.stack([s["cond"] for s in good]),
        "caption": [s["caption"] for s in good],
        "name": [s["name"] for s in good],
        "skipped": skipped,
    }
