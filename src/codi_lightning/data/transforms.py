"""Paired transforms: one crop for condition and target, conditions made on the fly."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, Literal

import torch
from PIL import Image

from .decode import GRID, BadSample, cache_geometry
from .pixels import as_u8, float_pixels, resize_u8, to_image, u8_to_float
from .recipes import ConditionRecipe, make_recipe, sr_bicubic

__all__ = ["PairTransform", "collate", "condition_scale", "make_recipe", "sr_bicubic"]

CondMismatch = Literal["resize", "skip"]


def to_tensor01(image: Image.Image) -> torch.Tensor:
    """PIL image -> float tensor [C, H, W] in [0, 1] (uint8 until this one conversion)."""
    return u8_to_float(as_u8(image))


def _resized_crop(
    image: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int]
) -> torch.Tensor:
    """``image.resize(size, BICUBIC).crop(box)`` as uint8 pixels [C, h, w] (a view of
    the resized image; ``box`` is in its coordinates; ``pixels.resize_u8``)."""
    x = resize_u8(as_u8(image if image.mode == "RGB" else image.convert("RGB")), size)
    return x[:, box[1] : box[3], box[0] : box[2]]


def _resized_crop_mask(
    mask: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int]
) -> Image.Image:
    """``mask.resize(size, NEAREST).crop(box)``, resampling only the crop."""
    if mask.size == size:
        return mask.crop(box)
    sx, sy = mask.width / size[0], mask.height / size[1]
    source = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return mask.resize((box[2] - box[0], box[3] - box[1]), Image.NEAREST, box=source)


def condition_scale(target: tuple[int, int], cond: tuple[int, int]) -> int | None:
    """The integer factor ``k`` with ``cond == target / k`` (floor or round, per side;
    1 for equal sizes), or None when the sizes are not related by an integer factor."""
    if cond == target:
        return 1
    (w, h), (cw, ch) = target, cond
    k = round(w / cw)
    if k < 2 or round(h / ch) != k:
        return None
    return k if abs(cw * k - w) < k and abs(ch * k - h) < k else None


class PairTransform:
    """Resize, crop (random or centre) and flip target and condition identically; derive
    the condition when the sample has none; drop captions for guidance; record the
    geometry SDXL conditions on (``original_size``: the stored image's (h, w) before
    resizing; ``crop_top_left``: (top, left) of the crop in the resized image, mirrored
    to the flipped image's left edge when the sample is flipped).

    A stored condition an integer factor smaller than the target (a low-resolution SR
    input) is scaled up (bicubic) straight to the target's resized size before the
    shared crop. Other size mismatches are resized the same way (``cond_mismatch=
    "resize"``) or skipped as ``size_mismatch`` (``"skip"``).

    Args:
        resolution: output side in pixels.
        random_crop: random (training) or centre (evaluation) crop.
        hflip: random horizontal flips.
        resize_shorter: scale the shorter side to ``resolution`` before cropping
            (images smaller than ``resolution`` are always scaled up).
        recipe: builds the condition from the cropped target when none is stored; may
            return ``(condition, mask)`` (inpainting), which adds a ``mask`` entry (so
            does a stored ``mask.png`` next to a stored condition).
        caption_dropout: probability of replacing the caption with "".
        cond_mismatch: what to do with a stored condition whose size is neither the
            target's nor an integer factor smaller: ``resize`` or ``skip``.
        uint8: return ``image`` and ``cond`` as uint8 pixels, for
            ``pixels.float_pixels`` to convert later (on the device: the data module
            does, which saves a worker about 1 ms per 512 px image and moves 4x fewer
            bytes); False: floats, ``image`` in [-1, 1] and ``cond`` in [0, 1].
    """

    def __init__(
        self,
        resolution: int,
        random_crop: bool = True,
        hflip: bool = False,
        resize_shorter: bool = True,
        recipe: ConditionRecipe | None = None,
        caption_dropout: float = 0.0,
        cond_mismatch: CondMismatch = "resize",
        uint8: bool = False,
    ) -> None:
        if cond_mismatch not in ("resize", "skip"):
            raise ValueError(f"cond_mismatch={cond_mismatch!r}; choose 'resize' or 'skip'")
        self.resolution = resolution
        self.random_crop = random_crop
        self.hflip = hflip
        self.resize_shorter = resize_shorter
        self.recipe = recipe
        self.caption_dropout = caption_dropout
        self.cond_mismatch = cond_mismatch
        self.uint8 = uint8

    def _check_condition(self, sample: Mapping[str, Any]) -> None:
        """Raise ``no_condition`` / ``size_mismatch`` for unusable stored conditions."""
        image, cond = sample["image"], sample["cond"]
        where = f"sample {sample['key']}"
        if cond is None and self.recipe is None:
            raise BadSample(
                "no_condition",
                "no cond.* member while data.condition=stored; store conditions in the "
                "shards or pick a recipe (data.condition=sr, inpaint, canny, ...)",
                where,
            )
        if cond is not None and self.cond_mismatch == "skip":
            if condition_scale(image.size, cond.size) is None:
                raise BadSample(
                    "size_mismatch",
                    f"condition {cond.size} vs target {image.size} is not an integer "
                    "factor; set data.cond_mismatch=resize to resize it",
                    where,
                )

    def _resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The target size before cropping (shorter side scaled to ``resolution``; the
        same rule the cache encodes with)."""
        return cache_geometry(size, self.resolution, self.resize_shorter)[0]

    def _decoded_as_resized(
        self, decoded: tuple[int, int], size: tuple[int, int]
    ) -> tuple[int, int]:
        """The decoded size when it is within one pixel of ``size`` per side (and still
        holds the crop), else ``size``.

        A 1365x1024 JPEG decoded at half scale in the DCT is 683x512, while the resize
        rule rounds 682.5 to 682: resampling 683 -> 682 columns would cost a whole
        bicubic pass (1.2 ms at 512 px) to move no pixel by more than one. Both are
        roundings of the same exact size, so the decoded one is kept."""
        r = self.resolution
        close = all(abs(d - s) <= 1 for d, s in zip(decoded, size, strict=True))
        return tuple(decoded) if close and min(decoded) >= r else size

    def _crop_box(self, size: tuple[int, int], rng: random.Random) -> tuple[int, int, int, int]:
        r = self.resolution
        w, h = size
        if self.random_crop:
            left, top = rng.randint(0, w - r), rng.randint(0, h - r)
        else:
            left, top = (w - r) // 2, (h - r) // 2
        return left, top, left + r, top + r

    def _grid_box(
        self, stored: tuple[int, int], latents: tuple[dict, dict], rng: random.Random
    ) -> tuple[int, int, int, int]:
        """The crop for a sample with cached latents: on the VAE's grid, inside the
        region the cache encoded (checked against the cache's own record)."""
        tensors, meta = latents
        cached = (meta.get("resolution"), meta.get("resize_shorter"))
        if cached != (str(self.resolution), str(bool(self.resize_shorter))):
            raise ValueError(
                f"the shards' cached latents were made with resolution={cached[0]}, "
                f"resize_shorter={cached[1]}, but data.resolution={self.resolution}, "
                f"data.resize_shorter={self.resize_shorter}: set those, or run "
                "`codi-lightning cache` again with the run's values"
            )
        r, g = self.resolution, int(meta.get("grid", GRID))
        if r % g:
            raise ValueError(f"data.resolution={r} is not a multiple of the VAE's grid ({g})")
        (w, h) = cache_geometry(stored, r, self.resize_shorter, g)[1]
        if tuple(tensors["mean"].shape[-2:]) != (h // g, w // g):  # this sample only
            raise BadSample(
                "corrupt_cache",
                f"cached latents of shape {tuple(tensors['mean'].shape)} do not match the "
                f"{w}x{h} region of a {stored[0]}x{stored[1]} image at resolution {r}",
            )
        if self.random_crop:
            left, top = g * rng.randint(0, (w - r) // g), g * rng.randint(0, (h - r) // g)
        else:
            left, top = g * ((w - r) // 2 // g), g * ((h - r) // 2 // g)
        return left, top, left + r, top + r

    def _latent_window(
        self, stored: tuple[int, int], latents: tuple[dict, dict], box: tuple, flipped: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached posterior's mean and std under the crop (of the mirror image's
        latents when the crop is flipped)."""
        tensors, g = latents[0], int(latents[1].get("grid", GRID))
        top, left, n = box[1] // g, box[0] // g, self.resolution // g
        prefix = ""
        if flipped:
            if "flip_mean" not in tensors:
                raise ValueError(
                    "data.hflip=true but the cached latents have no mirror image: run "
                    "`codi-lightning cache` with --hflip true, or set data.hflip=false"
                )
            w = cache_geometry(stored, self.resolution, self.resize_shorter, g)[1][0]
            prefix, left = "flip_", (w - box[2]) // g
        window = (slice(None), slice(top, top + n), slice(left, left + n))
        return tensors[prefix + "mean"][window], tensors[prefix + "std"][window]

    def __call__(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        self._check_condition(sample)
        image, cond = sample["image"], sample["cond"]
        stored = tuple(sample.get("size") or image.size)  # (w, h) before any reduced decoding
        original = (stored[1], stored[0])
        size = self._resized_size(stored)
        mask = sample.get("mask") if cond is not None else None  # a stored inpainting mask
        latents = sample.get("latents")
        if latents is None:
            size = self._decoded_as_resized(image.size, size)
        box = self._crop_box(size, rng) if latents is None else self._grid_box(stored, latents, rng)
        # resize-then-crop on uint8 tensors (torch's antialiased bicubic, PIL's filter,
        # 3-5x faster than PIL's resize; data/pixels.py), float only at the end
        pixels = _resized_crop(image, size, box)
        if cond is not None:
            cond = _resized_crop(cond, size, box)
            mask = _resized_crop_mask(mask, size, box) if mask is not None else None
        else:
            # a recipe with ``takes_pixels`` works on the uint8 crop itself
            tensors = getattr(self.recipe, "takes_pixels", False)
            made = self.recipe(pixels if tensors else to_image(pixels), rng)
            cond, mask = made if isinstance(made, tuple) else (made, None)
            if not isinstance(cond, torch.Tensor):
                cond = as_u8(cond if cond.mode == "RGB" else cond.convert("RGB"))
        top, left = box[1], box[0]
        flipped = self.hflip and rng.random() < 0.5
        if flipped:
            left = size[0] - box[2]  # the crop's left edge in the mirrored resized image
            pixels, cond = pixels.flip(-1), cond.flip(-1)
            mask = mask.transpose(Image.FLIP_LEFT_RIGHT) if mask is not None else None
        caption = sample["caption"]
        if self.caption_dropout and rng.random() < self.caption_dropout:
            caption = ""
        out = {
            "image": pixels,
            "cond": cond,
            "caption": caption,
            "key": sample["key"],
            "original_size": original,  # (h, w) before resizing
            "crop_top_left": (top, left),  # in the resized image
        }
        if not self.uint8:
            out = float_pixels(out)
        if mask is not None:
            out["mask"] = to_tensor01(mask.convert("L"))  # 1 = pixels to fill
        if latents is not None:
            out["latent_mean"], out["latent_std"] = self._latent_window(
                stored, latents, box, flipped
            )
        if "text" in sample:
            out["text"] = sample["text"][0]
        return out


def stack_pixels(xs: list[torch.Tensor]) -> torch.Tensor:
    """[C, H, W] tensors -> [B, C, H, W]. Pixels that lie channels-last in memory (the
    loader's uint8 crops) stay so: stacking them is then a row copy, 5x faster than
    the transposing copy into the default layout (0.56 against 3.1 ms for eight 512 px
    crops). ``pixels.float_pixels`` makes the layout contiguous on the device."""
    if xs and all(x.dim() == 3 and x.stride(0) == 1 and x.shape[0] > 1 for x in xs):
        return torch.stack([x.permute(1, 2, 0) for x in xs]).permute(0, 3, 1, 2)
    return torch.stack(xs)


def collate(
    samples: list[dict[str, Any]], skipped: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """Stack samples into a batch; ``skipped`` (the worker's cumulative skip counts) is
    copied into ``batch["skipped"]``; ``mask`` is stacked when every sample has one, and
    ``original_size`` / ``crop_top_left`` (long [B, 2]) when every sample records them."""
    batch = {
        "image": stack_pixels([s["image"] for s in samples]),
        "cond": stack_pixels([s["cond"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "skipped": dict(skipped or {}),
    }
    for field in ("original_size", "crop_top_left"):
        if samples and all(field in s for s in samples):
            batch[field] = torch.tensor([list(s[field]) for s in samples], dtype=torch.long)
    if samples and all("mask" in s for s in samples):
        batch["mask"] = torch.stack([s["mask"] for s in samples])
    for field in ("latent_mean", "latent_std"):  # cached latents (data/cache.py)
        if samples and all(field in s for s in samples):
            batch[field] = torch.stack([s[field] for s in samples])
    if samples and all("text" in s for s in samples):  # cached text conditioning
        batch["text"] = {
            k: torch.stack([s["text"][k] for s in samples]) for k in samples[0]["text"]
        }
    return batch
