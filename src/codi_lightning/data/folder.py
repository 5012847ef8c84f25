"""A folder of condition images for ``codi-lightning predict``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from .decode import IMAGE_EXTS, decode_image
from .transforms import to_tensor01


class ConditionFolder(Dataset):
    """Condition images (recursively) with optional prompts.

    Each image is scaled by ``upscale`` (bicubic; e.g. 4 for 4x super-resolution, whose
    condition enters at the output resolution) and then to the nearest multiple of
    ``multiple`` on each side. The prompt is the side file ``<stem>.txt`` if present,
    else ``prompt``.
    """

    def __init__(self, root: str, prompt: str = "", upscale: int = 1, multiple: int = 64) -> None:
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

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        image = decode_image(path.read_bytes())
        w, h = image.size
        m = self.multiple
        size = (max(m, round(w * self.upscale / m) * m), max(m, round(h * self.upscale / m) * m))
        if size != image.size:
            image = image.resize(size, Image.BICUBIC)
        side = path.with_suffix(".txt")
        prompt = (
            side.read_text(encoding="utf-8", errors="replace").strip()
            if side.is_file()
            else self.prompt
        )
        return {
            "cond": to_tensor01(image),
            "caption": prompt,
            "name": str(path.relative_to(self.root).with_suffix("")),
        }


def collate_conditions(samples: list[dict[str, Any]]) -> dict[str, Any]:
    sizes = {tuple(s["cond"].shape) for s in samples}
    if len(sizes) > 1:
        raise ValueError(
            f"predict images of different sizes in one batch ({sorted(sizes)}): set "
            "data.predict_batch_size=1 or give images of one size"
        )
    return {
        "cond": torch.stack([s["cond"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "name": [s["name"] for s in samples],
    }
