"""The loader's uint8 resize against PIL's bicubic resize (the reference it replaces),
and the PIL <-> tensor conversions around it."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from codi_lightning.data.pixels import as_u8, resize_bicubic, resize_u8, to_image, u8_to_float
from codi_lightning.data.recipes import SuperResolution


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((5, 7, 3)) * 255).astype(np.uint8))
    arr = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.float32)
    arr = arr + rng.normal(0, 10, (h, w, 3))  # texture, so that the filter matters
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize(
    "size",
    [(160, 120), (96, 72), (40, 30), (17, 13), (330, 250), (640, 480), (201, 120)],
    ids=["1.25x down", "2.1x down", "5x down", "odd 12x down", "1.65x up", "3.2x up", "w only"],
)
def test_resize_matches_pil_bicubic(size):
    image = _photo(201, 151)
    ours = np.asarray(resize_bicubic(image, size)).astype(int)
    pil = np.asarray(image.resize(size, Image.BICUBIC)).astype(int)
    diff = np.abs(ours - pil)
    assert diff.max() <= 2  # uint8 rounding of the same filter
    assert (diff > 0).mean() < 0.01
    # the filter is PIL's antialiased one: a plain (point-sampled) bicubic is far off
    if size[0] * 2 < image.width:
        plain = (
            torch.nn.functional.interpolate(
                as_u8(image)[None].float(), size=(size[1], size[0]), mode="bicubic"
            )[0]
            .round()
            .clamp(0, 255)
            .permute(1, 2, 0)
            .numpy()
            .astype(int)
        )
        assert np.abs(plain - pil).max() > 20


def test_conversions_round_trip_and_scale():
    image = _photo(33, 21)
    x = as_u8(image)
    assert x.shape == (3, 21, 33) and x.dtype == torch.uint8
    assert np.array_equal(np.asarray(to_image(x)), np.asarray(image))
    gray = image.convert("L")
    assert as_u8(gray).shape == (1, 21, 33)
    assert np.array_equal(np.asarray(to_image(as_u8(gray))), np.asarray(gray))
    assert as_u8(image.convert("P")).shape == (3, 21, 33)  # palette -> RGB
    crop = x[:, 3:13, 5:15]  # a view with the strides of a crop
    f = u8_to_float(crop, -1.0, 1.0)
    assert f.is_contiguous() and f.dtype == torch.float32
    torch.testing.assert_close(f, crop.double().mul(2 / 255).sub(1).float())
    torch.testing.assert_close(u8_to_float(crop), crop.float() / 255)
    with pytest.raises(TypeError, match="uint8"):
        resize_u8(x.float(), (10, 10))


def test_super_resolution_on_tensors_equals_on_images():
    image = _photo(64, 48)
    recipe = SuperResolution(4)
    from_pil = np.asarray(recipe(image, random.Random(0)))
    from_u8 = recipe(as_u8(image), random.Random(0))
    assert isinstance(from_u8, torch.Tensor) and from_u8.shape == (3, 48, 64)
    assert np.array_equal(np.asarray(to_image(from_u8)), from_pil)
    low = recipe.low(as_u8(image), random.Random(0))
    assert low.shape == (3, 12, 16)
    # and the result is PIL's bicubic down and up (to uint8 rounding)
    pil = np.asarray(image.resize((16, 12), Image.BICUBIC).resize((64, 48), Image.BICUBIC))
    assert np.abs(from_pil.astype(int) - pil.astype(int)).max() <= 2
