"""uint8 pixels between PIL and torch, and the one bicubic resize the loader uses.

``resize_bicubic`` runs torch's antialiased bicubic interpolation on uint8 tensors
kept channels-last (how a PIL image's pixels lie in memory): the same filter as PIL's
``Image.resize(..., Image.BICUBIC)`` (Keys' cubic with a = -0.5, its support widened by
the scale when shrinking), equal to PIL's output to within 2 levels of 255 on under 1%
of the pixels (``tests/data/test_pixels.py``), and 3-5x faster on one thread: PIL's
resize was the largest cost of a loader worker (docs/performance.md).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["as_u8", "float_pixels", "resize_bicubic", "resize_u8", "to_image", "u8_to_float"]

_U8_MODES = ("RGB", "RGBA", "L")


def as_u8(image: Image.Image) -> torch.Tensor:
    """The pixels of ``image`` as a uint8 tensor [C, H, W] (one copy; channels-last in
    memory, which torch's uint8 resize is fastest on). Modes other than RGB, RGBA and L
    are converted to RGB first."""
    if image.mode not in _U8_MODES:
        image = image.convert("RGB")
    pixels = np.array(image)  # a writable copy (np.asarray gives a read-only view)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return torch.from_numpy(pixels).permute(2, 0, 1)


def to_image(x: torch.Tensor) -> Image.Image:
    """A uint8 tensor [C, H, W] (C = 1, 3 or 4) as a PIL image (L, RGB or RGBA)."""
    pixels = x.permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)


def resize_u8(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize (antialiased, PIL's filter) of a uint8 tensor [C, H, W] to
    ``size`` = (width, height); returned as is when it already has that size."""
    if x.dtype != torch.uint8:
        raise TypeError(f"resize_u8 takes uint8 pixels, got {x.dtype}")
    if tuple(x.shape[-2:]) == (size[1], size[0]):
        return x
    out = F.interpolate(x[None], size=(size[1], size[0]), mode="bicubic", antialias=True)
    return out[0]


def resize_bicubic(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image.resize(size, Image.BICUBIC)`` computed by :func:`resize_u8` (to within
    2 levels of PIL's result); other modes than RGB, RGBA and L go to PIL."""
    if image.size == tuple(size):
        return image
    if image.mode not in _U8_MODES:
        return image.resize(size, Image.BICUBIC)
    return to_image(resize_u8(as_u8(image), size))


def u8_to_float(x: torch.Tensor, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """uint8 pixels (any shape and strides) -> contiguous float32 in [low, high] on
    their device; uint8 until this one conversion."""
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    out.copy_(x)
    out.mul_((high - low) / 255.0)
    return out.add_(low) if low else out


def float_pixels(batch: dict) -> dict:
    """A loader batch with uint8 pixels -> the float batch the modules take: ``image`` in
    [-1, 1], ``cond`` in [0, 1] (contiguous float32, on the tensors' device). Float
    entries are left as they are, so it can be applied twice.

    ``ShardDataModule`` ships uint8 pixels and calls this after the batch reaches the
    device (``on_after_batch_transfer``); code that iterates its loaders directly calls
    it itself.
    """
    out = dict(batch)
    for key, low in (("image", -1.0), ("cond", 0.0)):
        x = out.get(key)
        if isinstance(x, torch.Tensor) and x.dtype == torch.uint8:
            out[key] = u8_to_float(x, low, 1.0)
    return out
