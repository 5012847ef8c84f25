"""The loader's shortcuts: resizing on uint8 tensors (torch's antialiased bicubic instead
of PIL's), and decoding large JPEGs at reduced scale. Both are checked against the
longhand path (decode in full, resize the whole image with PIL, crop) that they replace."""

import io
import random

import numpy as np
import torch
from PIL import Image

from codi_lightning.data import ShardDataModule, make_recipe, write_shards
from codi_lightning.data import decode as decode_module
from codi_lightning.data.decode import decode_sample
from codi_lightning.data.transforms import PairTransform, to_tensor01


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth colour field with mild texture (photo-like, unlike white noise)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8))
    arr = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.float32)
    arr = arr + rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _longhand(image: Image.Image, out: dict, resolution: int) -> torch.Tensor:
    """Resize the whole image (shorter side to ``resolution``), then crop where ``out``
    says the crop was taken."""
    w, h = image.size
    scale = resolution / min(w, h)
    resized = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                           Image.BICUBIC)  # fmt: skip
    top, left = out["crop_top_left"]
    return to_tensor01(resized.crop((left, top, left + resolution, top + resolution)))


def test_the_crop_has_the_pixels_of_pil_resizing_then_cropping():
    image = _photo(203, 151)
    low = image.resize((51, 38), Image.BICUBIC)  # a stored condition of another size
    t = PairTransform(64, random_crop=True, resize_shorter=True)
    for seed in range(4):
        out = t({"key": "k", "image": image, "cond": low, "caption": ""}, random.Random(seed))
        assert out["original_size"] == (151, 203)
        ref = _longhand(image, out, 64)
        # the same filter as PIL's: uint8 rounding only
        assert ((out["image"] + 1) / 2 - ref).abs().max() <= 2 / 255 + 1e-6
        ref_cond = _longhand(low, out, 64)
        assert (out["cond"] - ref_cond).abs().max() <= 2 / 255 + 1e-6


def test_large_jpegs_decode_at_reduced_scale_and_keep_their_stored_size():
    image = _photo(1100, 800)
    raw = {"__key__": "k", "jpg": _jpeg(image)}
    full = decode_sample(raw)
    small = decode_sample(raw, draft=256)  # 800 >= 2 x 256 (not 4 x): half scale
    assert full["image"].size == (1100, 800) and small["image"].size == (550, 400)
    assert small["size"] == full["size"] == (1100, 800)
    t = PairTransform(256, random_crop=True, resize_shorter=True, recipe=lambda im, rng: im)
    a, b = (t(s, random.Random(3)) for s in (full, small))
    assert a["original_size"] == b["original_size"] == (800, 1100)
    assert a["crop_top_left"] == b["crop_top_left"]
    diff = (a["image"] - b["image"]).abs() / 2  # in [0, 1] units
    assert diff.mean() < 0.01 and diff.max() < 0.15  # DCT-domain scaling: close, not equal
    # a stored condition is matched to the stored size: no reduced decoding then
    cond = {"__key__": "k", "jpg": raw["jpg"], "cond.jpg": _jpeg(image.resize((275, 200)))}
    assert decode_sample(cond, draft=256)["image"].size == (1100, 800)
    png = io.BytesIO()
    image.save(png, format="PNG")
    assert decode_sample({"__key__": "k", "png": png.getvalue()}, draft=256)["image"].size == (
        1100, 800,
    )  # fmt: skip


def test_the_datamodule_decodes_large_jpegs_at_reduced_scale(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        _photo(600, 520, seed=i).save(folder / f"{i}.jpg", quality=92)
    write_shards(str(folder), str(tmp_path / "train-%06d.tar"), progress=False)
    seen = []
    real = decode_module.reduce_jpeg_decoding

    def spy(img, short_side):
        real(img, short_side)
        seen.append((short_side, img.size))

    monkeypatch.setattr(decode_module, "reduce_jpeg_decoding", spy)
    dm = ShardDataModule(str(tmp_path / "train-000000.tar"), None, resolution=128, batch_size=4,
                         num_workers=0, condition="sr", hflip=False)  # fmt: skip
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 128, 128)
    assert batch["original_size"].tolist() == [[520, 600]] * 4
    assert seen and all(s == (128, (150, 130)) for s in seen)  # 520 >= 4 x 128: quarter scale


def test_a_decoded_size_one_pixel_off_the_resize_rule_is_not_resampled():
    """A 129x64 JPEG decoded at half scale is 65x32; the resize rule for 32 px rounds
    64.5 to 64. The decoded image is taken as the resized one (no 65 -> 64 resampling):
    the crop is the decoded pixels themselves. One more pixel off, it is resized."""
    decoded = decode_sample({"__key__": "k", "jpg": _jpeg(_photo(129, 64))}, draft=32)
    assert decoded["image"].size == (65, 32) and decoded["size"] == (129, 64)
    t = PairTransform(32, random_crop=False, recipe=make_recipe("sr", 4))
    out = t(decoded, random.Random(0))
    top, left = out["crop_top_left"]
    assert (top, left) == (0, (65 - 32) // 2)
    crop = decoded["image"].crop((left, 0, left + 32, 32))
    torch.testing.assert_close(out["image"], to_tensor01(crop) * 2 - 1, rtol=0, atol=1e-6)

    far = {**decoded, "image": decoded["image"].resize((67, 33))}  # 2 px off: resampled
    out = t(far, random.Random(0))
    assert tuple(out["crop_top_left"]) == (0, (64 - 32) // 2)
