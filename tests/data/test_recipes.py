"""Condition recipes: super-resolution (bicubic, Real-ESRGAN-style), inpainting, Canny."""

import random

import numpy as np
import pytest
import torch
from data_helpers import structured
from PIL import Image

from codi_lightning.data import (
    PairTransform,
    ShardDataModule,
    canny_edges,
    float_pixels,
    make_recipe,
)
from codi_lightning.data.recipes import (
    INPAINT_FILL,
    SuperResolution,
    box_mask,
    gaussian_kernel,
    inpaint_condition,
    realesrgan_low,
    stroke_mask,
)
from codi_lightning.data.transforms import collate, sr_bicubic, to_tensor01


def _arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_sr_recipe_factors(factor):
    img = structured((64, 64))
    recipe = make_recipe("sr", factor)
    assert recipe.low(img, random.Random(0)).size == (64 // factor, 64 // factor)
    t = PairTransform(32, random_crop=False, resize_shorter=False, recipe=recipe)
    out = t({"key": "k", "image": img, "cond": None, "caption": ""}, random.Random(0))
    expected = sr_bicubic(img.crop((16, 16, 48, 48)), factor)
    torch.testing.assert_close(out["cond"], to_tensor01(expected))
    # larger factors lose more detail
    assert (out["cond"] - (out["image"] + 1) / 2).abs().mean() > 0.001 * factor


def test_realesrgan_is_reproducible_and_seed_dependent():
    img = structured((96, 80), seed=3)
    a = realesrgan_low(img, 4, random.Random(7))
    b = realesrgan_low(img, 4, random.Random(7))
    c = realesrgan_low(img, 4, random.Random(8))
    assert a.size == (24, 20) and a.mode == "RGB"
    assert np.array_equal(_arr(a), _arr(b))
    assert not np.array_equal(_arr(a), _arr(c))
    # a real degradation: not the plain bicubic downscale, but still the same picture
    plain = _arr(img.resize((24, 20), Image.BICUBIC))
    diffs = [
        np.abs(_arr(realesrgan_low(img, 4, random.Random(s))) - plain).mean() for s in range(6)
    ]
    assert min(diffs) > 1.0 and max(diffs) < 90


def test_realesrgan_recipe_in_the_transform_is_seeded():
    img = structured((64, 64), seed=1)
    t = PairTransform(32, random_crop=True, recipe=make_recipe("sr_realesrgan", 4))
    sample = {"key": "k", "image": img, "cond": None, "caption": ""}
    first = t(sample, random.Random(5))
    again = t(sample, random.Random(5))
    other = t(sample, random.Random(6))
    assert first["cond"].shape == (3, 32, 32)
    assert 0 <= first["cond"].min() and first["cond"].max() <= 1
    torch.testing.assert_close(first["cond"], again["cond"], rtol=0, atol=0)
    assert not torch.equal(first["cond"], other["cond"])


def test_anisotropic_kernel_is_normalised_and_rotated():
    k = gaussian_kernel(21, 4.0, 1.0, 0.0)
    assert k.shape == (21, 21) and abs(k.sum() - 1) < 1e-5
    assert k[10, 14] > k[14, 10]  # wide along x
    r = gaussian_kernel(21, 4.0, 1.0, np.pi / 2)
    np.testing.assert_allclose(r, k.T, atol=1e-6)


def test_inpaint_condition_masks_with_grey():
    img = structured((64, 48), seed=2)
    for seed in range(6):
        cond, mask = inpaint_condition(img, random.Random(seed))
        m = np.asarray(mask) > 127
        assert 0 < m.mean() < 0.95
        c = _arr(cond)
        assert (c[m] == INPAINT_FILL).all()
        assert np.array_equal(c[~m], _arr(img)[~m])


def _regions(kind: str, w: int, h: int) -> list[np.ndarray]:
    """The masks a ``kind`` recipe may draw, written with numpy slicing: the four halves,
    or the four quadrants' complements (the kept quadrant takes an odd middle line)."""
    out = []
    if kind == "half":
        for rows, cols in ((slice(0, h // 2), slice(None)), (slice(h - h // 2, h), slice(None)),
                           (slice(None), slice(0, w // 2)), (slice(None), slice(w - w // 2, w))):  # fmt: skip
            m = np.zeros((h, w), bool)
            m[rows, cols] = True
            out.append(m)
    else:
        for rows in (slice(0, (h + 1) // 2), slice(h // 2, h)):
            for cols in (slice(0, (w + 1) // 2), slice(w // 2, w)):
                m = np.ones((h, w), bool)
                m[rows, cols] = False
                out.append(m)
    return out


@pytest.mark.parametrize("kind", ["half", "three_quarters"])
@pytest.mark.parametrize("size", [(32, 32), (33, 21)])
def test_large_masks_cover_one_of_four_regions(kind, size):
    """The ``half`` and ``three_quarters`` masks, against the regions written with numpy
    slicing: each seed gives exactly one of the four, all four occur, and the condition
    is grey there and the image elsewhere."""
    w, h = size
    regions = _regions(kind, w, h)
    recipe = make_recipe("inpaint", inpaint_mask=kind)
    img = structured(size, seed=3)
    seen = set()
    for seed in range(24):
        cond, mask = recipe(img, random.Random(seed))
        m = np.asarray(mask) > 127
        match = [i for i, region in enumerate(regions) if np.array_equal(m, region)]
        assert len(match) == 1
        seen.add(match[0])
        assert (_arr(cond)[m] == INPAINT_FILL).all()
        assert np.array_equal(_arr(cond)[~m], _arr(img)[~m])
    assert seen == {0, 1, 2, 3}


def test_unknown_inpaint_mask_is_refused_by_the_data_module():
    with pytest.raises(ValueError, match="data.inpaint_mask='disc'.*box_or_stroke, half, three_q"):
        ShardDataModule(None, None, resolution=32, condition="inpaint", inpaint_mask="disc")


def test_box_and_stroke_masks_differ_in_shape():
    g = np.random.default_rng(0)
    box = np.asarray(box_mask((64, 64), g)) > 0
    rows, cols = np.where(box)
    assert box.any()
    strokes = [np.asarray(stroke_mask((64, 64), np.random.default_rng(s))) > 0 for s in range(5)]
    assert all(s.any() for s in strokes)
    # a free-form stroke mask is not a union of axis-aligned boxes filling its bounding box
    fill = [s[np.ix_(s.any(1), s.any(0))].mean() for s in strokes]
    assert min(fill) < 0.9


def test_inpaint_mask_follows_flips_and_is_collated():
    img = structured((48, 48), seed=4)
    t = PairTransform(32, random_crop=True, hflip=True, recipe=make_recipe("inpaint"))
    outs = [t({"key": "k", "image": img, "cond": None, "caption": ""}, random.Random(s)) for s in range(6)]  # fmt: skip
    for out in outs:
        mask = out["mask"][0] > 0.5
        assert mask.any()
        target = (out["image"] + 1) / 2
        torch.testing.assert_close(out["cond"][:, ~mask], target[:, ~mask], atol=1e-6, rtol=0)
        assert torch.allclose(out["cond"][:, mask], torch.tensor(128 / 255), atol=1e-6)
    batch = collate(outs)
    assert batch["mask"].shape == (6, 1, 32, 32)
    assert "mask" not in collate([{k: v for k, v in o.items() if k != "mask"} for o in outs])


def _step(left: int, right: int, size=(40, 40)) -> np.ndarray:
    arr = np.full(size, left, dtype=np.uint8)
    arr[:, size[1] // 2 :] = right
    return arr


def test_canny_finds_thin_edges():
    img = Image.new("RGB", (64, 64), "black")
    img.paste(Image.new("RGB", (32, 32), "white"), (16, 16))
    edges = np.asarray(canny_edges(img))[..., 0] > 0
    assert edges[32, 14:19].any() and edges[32, 46:51].any()  # left and right sides
    assert not edges[24:40, 24:40].any() and not edges[:8].any()  # flat areas
    assert edges[32].sum() <= 4  # non-maximum suppression: thin lines
    out = canny_edges(img)
    assert out.mode == "RGB" and out.size == (64, 64)


def test_canny_hysteresis_keeps_weak_edges_only_when_connected():
    # with no smoothing, a step of contrast c has Sobel magnitude 4c: 30 -> 120 (weak),
    # 60 -> 240 (strong) for the thresholds 100 / 200
    weak = _step(100, 130)
    assert not (np.asarray(canny_edges(Image.fromarray(weak).convert("RGB"), sigma=0)) > 0).any()
    joined = weak.copy()
    joined[:20, 20:] = 160  # the top half of the same edge is strong
    edges = np.asarray(canny_edges(Image.fromarray(joined).convert("RGB"), sigma=0))[..., 0] > 0
    rows = edges[:, 18:22].any(1)
    assert rows[2:38].all()  # the weak lower half is kept through the strong upper half


def test_canny_recipe_via_make_recipe():
    img = structured((40, 40))
    cond = make_recipe("canny")(img, random.Random(0))
    assert cond.size == img.size and set(np.unique(np.asarray(cond))) <= {0, 255}


def test_recipe_errors_name_the_fix():
    with pytest.raises(ValueError, match="sr_realesrgan"):
        make_recipe("depth")
    with pytest.raises(ValueError, match="integer >= 2"):
        make_recipe("sr", 1)
    with pytest.raises(ValueError, match="multiple of data.sr_factor"):
        ShardDataModule("x.tar", resolution=36, condition="sr", sr_factor=8)
    assert isinstance(make_recipe("sr_realesrgan", 2), SuperResolution)


@pytest.mark.parametrize("condition", ["sr", "sr_realesrgan", "inpaint", "canny"])
def test_every_recipe_through_the_training_stream(tiny_shards, condition):
    dm = ShardDataModule(tiny_shards["train"], tiny_shards["val"], resolution=32, batch_size=4,
                         num_workers=0, condition=condition, sr_factor=8, hflip=True,
                         shuffle_buffer=8)  # fmt: skip
    batch = float_pixels(next(iter(dm.train_dataloader())))
    assert batch["image"].shape == batch["cond"].shape == (4, 3, 32, 32)
    assert -1 <= batch["image"].min() and batch["image"].max() <= 1
    assert 0 <= batch["cond"].min() and batch["cond"].max() <= 1
    assert batch["skipped"] == {} and len(batch["key"]) == len(batch["caption"]) == 4
    assert ("mask" in batch) == (condition == "inpaint")
    if condition == "inpaint":
        assert batch["mask"].shape == (4, 1, 32, 32)
