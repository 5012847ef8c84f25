"""The geometry SDXL conditions on: original size and crop top-left, recorded where the
transforms resize and crop (docs/data.md, "Batches")."""

import random

import torch
from PIL import Image

from codi_lightning.data.transforms import PairTransform, collate, to_tensor01
from codi_lightning.models import ImageSizes


def _gradient(w: int, h: int) -> Image.Image:
    """Pixel (x, y) has red = x, green = y: a crop's position can be read off its pixels."""
    xs = torch.arange(w).view(1, w).expand(h, w)
    ys = torch.arange(h).view(h, 1).expand(h, w)
    arr = torch.stack([xs, ys, torch.zeros_like(xs)], -1).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def test_original_size_and_crop_are_those_of_the_crop_taken():
    img = _gradient(80, 48)  # w, h
    t = PairTransform(32, random_crop=True, hflip=True, resize_shorter=False)
    flipped = 0
    for seed in range(8):
        out = t({"key": "k", "image": img, "cond": img, "caption": ""}, random.Random(seed))
        top, left = out["crop_top_left"]
        assert out["original_size"] == (48, 80)
        pixels = to_tensor01(img.crop((left, top, left + 32, top + 32)))
        mirrored = to_tensor01(
            img.transpose(Image.FLIP_LEFT_RIGHT).crop((left, top, left + 32, top + 32))
        )
        image = (out["image"] + 1) / 2
        if torch.allclose(image, pixels, atol=1e-6):
            continue
        torch.testing.assert_close(image, mirrored, atol=1e-6, rtol=0)  # the flipped image's crop
        flipped += 1
    assert 0 < flipped < 8


def test_resized_samples_record_the_size_before_resizing_and_batches_stack_them():
    t = PairTransform(32, random_crop=False, resize_shorter=True)
    a = t({"key": "a", "image": _gradient(128, 64), "cond": _gradient(128, 64), "caption": ""},
          random.Random(0))  # fmt: skip
    b = t({"key": "b", "image": _gradient(32, 48), "cond": _gradient(32, 48), "caption": ""},
          random.Random(0))  # fmt: skip
    assert a["original_size"] == (64, 128) and a["crop_top_left"] == (0, 16)  # 64x32 -> centre
    assert b["original_size"] == (48, 32) and b["crop_top_left"] == (8, 0)
    batch = collate([a, b])
    assert batch["original_size"].dtype == torch.long
    assert batch["original_size"].tolist() == [[64, 128], [48, 32]]
    assert batch["crop_top_left"].tolist() == [[0, 16], [8, 0]]
    sizes = ImageSizes.from_batch(batch)
    assert sizes.target_size.tolist() == [[32, 32], [32, 32]]
    assert torch.equal(sizes.original_size, batch["original_size"])


def test_batches_without_sizes_default_to_the_target_and_no_crop():
    sizes = ImageSizes.from_batch({"cond": torch.zeros(3, 3, 24, 40)})
    assert sizes.original_size.tolist() == [[24, 40]] * 3
    assert sizes.crop_top_left.tolist() == [[0, 0]] * 3
    assert sizes.target_size.tolist() == [[24, 40]] * 3
