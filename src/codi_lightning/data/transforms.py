"""Paired transforms: one crop for condition and target, conditions made on the fly."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from .decode import BadSample


def sr_bicubic(image: Image.Image, factor: int) -> Image.Image:
    """Super-resolution condition: bicubic downscale by ``factor``, upscale back (the
    condition enters the adapter at the target's pixel resolution)."""
    w, h = image.size
    low = image.resize((max(1, w // factor), max(1, h // factor)), Image.BICUBIC)
    return low.resize((w, h), Image.BICUBIC)


# name -> (image, rng) -> condition. Recipes that need the stored condition use "stored".
ConditionRecipe = Callable[[Image.Image, random.Random], Image.Image]


def make_recipe(name: str, sr_factor: int = 4) -> ConditionRecipe | None:
    """The on-the-fly condition recipe for ``data.condition`` (None: must be stored)."""
    if name == "stored":
        return None
    if name == "sr":
        return lambda img, rng: sr_bicubic(img, sr_factor)
    raise ValueError(f"data.condition={name!r}; choose 'stored' or 'sr'")


def to_tensor01(image: Image.Image) -> torch.Tensor:
    return pil_to_tensor(image).float() / 255.0


class PairTransform:
    """Resize, crop (random or centre) and flip target and condition identically; derive
    the condition when the sample has none; drop captions for guidance.

    Args:
        resolution: output side in pixels.
        random_crop: random (training) or centre (evaluation) crop.
        hflip: random horizontal flips.
        resize_shorter: scale the shorter side to ``resolution`` before cropping
            (images smaller than ``resolution`` are always scaled up).
        recipe: builds the condition from the cropped target when none is stored.
        caption_dropout: probability of replacing the caption with "".
    """

    def __init__(
        self,
        resolution: int,
        random_crop: bool = True,
        hflip: bool = False,
        resize_shorter: bool = True,
        recipe: ConditionRecipe | None = None,
        caption_dropout: float = 0.0,
    ) -> None:
        self.resolution = resolution
        self.random_crop = random_crop
        self.hflip = hflip
        self.resize_shorter = resize_shorter
        self.recipe = recipe
        self.caption_dropout = caption_dropout

    def __call__(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        image, cond = sample["image"], sample["cond"]
        if cond is None and self.recipe is None:
            raise BadSample(
                "no_condition", f"{sample['key']} has no cond.* and data.condition=stored"
            )
        if cond is not None and cond.size != image.size:
            cond = cond.resize(image.size, Image.BICUBIC)
        r = self.resolution
        w, h = image.size
        if self.resize_shorter or min(w, h) < r:
            scale = r / min(w, h)
            size = (max(r, round(w * scale)), max(r, round(h * scale)))
            image = image.resize(size, Image.BICUBIC)
            cond = cond.resize(size, Image.BICUBIC) if cond is not None else None
            w, h = size
        if self.random_crop:
            left, top = rng.randint(0, w - r), rng.randint(0, h - r)
        else:
            left, top = (w - r) // 2, (h - r) // 2
        box = (left, top, left + r, top + r)
        image = image.crop(box)
        cond = cond.crop(box) if cond is not None else self.recipe(image, rng)
        if self.hflip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            cond = cond.transpose(Image.FLIP_LEFT_RIGHT)
        caption = sample["caption"]
        if self.caption_dropout and rng.random() < self.caption_dropout:
            caption = ""
        return {
            "image": to_tensor01(image) * 2 - 1,  # x in [-1, 1]
            "cond": to_tensor01(cond),  # c in [0, 1]
            "caption": caption,
            "key": sample["key"],
        }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "cond": torch.stack([s["cond"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
    }
