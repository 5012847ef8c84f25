"""Bad input: every case is skipped and counted per reason, nothing crashes or hangs."""

import io
import json
import random
from pathlib import Path

import pytest
import torch
import webdataset as wds
from data_helpers import encode, first_batch, png_header, solid, structured, write_tar
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from codi_lightning.data import (
    BadSample,
    PairTransform,
    ShardDataModule,
    decode_sample,
    write_edit_shards,
    write_shards,
)
from codi_lightning.data.datamodule import MissingShardsError, PairStage
from codi_lightning.data.folder import ConditionFolder, collate_conditions
from codi_lightning.data.transforms import condition_scale


def _dm(shards, **kw) -> ShardDataModule:
    kw = {"resolution": 16, "batch_size": 1, "num_workers": 0, "condition": "sr", **kw}
    return ShardDataModule(shards, shards, **kw)


def _val(dm: ShardDataModule) -> tuple[list[str], dict[str, int]]:
    keys = [k for b in dm.val_dataloader() for k in b["key"]]
    return keys, dict(dm.stages["val"].skipped)


def test_corrupt_image_bytes_are_skipped(tmp_path):
    shard = write_tar(tmp_path / "s.tar", {"a.png": solid(), "b.png": b"\x89PNG\r\n\x1a\ngarbage",
                                           "c.jpg": solid(fmt="JPEG")[:60], "d.png": solid()})  # fmt: skip
    keys, skipped = _val(_dm(str(shard)))
    assert keys == ["a", "d"] and skipped == {"corrupt_image": 2}


def test_truncated_tar_keeps_the_samples_before_the_cut(tmp_path):
    members = {f"s{i}.png": encode(structured((48, 48), seed=i)) for i in range(6)}
    whole = write_tar(tmp_path / "whole.tar", members).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) // 2])
    keys, skipped = _val(_dm(str(cut)))
    assert 1 <= len(keys) < 6 and keys == [f"s{i}" for i in range(len(keys))]
    assert skipped == {"truncated_shard": 1}


def test_missing_and_non_tar_shards_are_counted(tmp_path):
    good = write_tar(tmp_path / "good.tar", {"a.png": solid()})
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 40)
    shards = [str(good), str(tmp_path / "missing.tar"), str(junk)]
    keys, skipped = _val(_dm(shards))
    assert keys == ["a"] and skipped == {"unreadable_shard": 1, "corrupt_shard": 1}


def test_sample_without_target(tmp_path):
    shard = write_tar(tmp_path / "s.tar", {"a.txt": b"only a caption", "b.png": solid(),
                                           "c.cond.png": solid()})  # fmt: skip
    keys, skipped = _val(_dm(str(shard)))
    assert keys == ["b"] and skipped == {"no_target": 2}


def test_condition_missing_for_tasks_that_need_it(tmp_path):
    shard = write_tar(tmp_path / "s.tar", {"a.png": solid(), "a.cond.png": solid(),
                                           "b.jpg": solid(fmt="JPEG"), "c.png": solid(),
                                           "c.cond.png": b"broken"})  # fmt: skip
    keys, skipped = _val(_dm(str(shard), condition="stored"))
    assert keys == ["a"] and skipped == {"no_condition": 1, "corrupt_condition": 1}
    keys, skipped = _val(_dm(str(shard), condition="canny"))  # a recipe fills in for b
    assert keys == ["a", "b"] and skipped == {"corrupt_condition": 1}


def test_condition_scale():
    assert condition_scale((64, 48), (64, 48)) == 1
    assert condition_scale((64, 48), (16, 12)) == 4
    assert condition_scale((65, 49), (16, 12)) == 4  # floor-sized low resolution
    assert condition_scale((64, 48), (32, 12)) is None  # different factors per side
    assert condition_scale((70, 48), (16, 12)) is None
    assert condition_scale((64, 48), (50, 40)) is None
    assert condition_scale((16, 12), (64, 48)) is None  # larger condition


def test_non_integer_size_mismatch_resize_or_skip(tmp_path):
    shard = write_tar(tmp_path / "s.tar", {
        "a.png": solid(size=(40, 30)), "a.cond.png": solid((0, 0, 255), size=(33, 21)),
        "b.png": solid(size=(40, 32)), "b.cond.png": solid((0, 0, 255), size=(10, 8)),
    })  # fmt: skip
    keys, skipped = _val(_dm(str(shard), condition="stored"))
    assert keys == ["a", "b"] and skipped == {}
    keys, skipped = _val(_dm(str(shard), condition="stored", cond_mismatch="skip"))
    assert keys == ["b"] and skipped == {"size_mismatch": 1}  # b: integer factor 4


def test_low_resolution_condition_stays_aligned_through_crop_and_flip():
    """A stored 4x smaller condition is scaled up to the target size before the shared
    crop and flip: the same result as storing the upscaled condition."""
    img = structured((96, 64), seed=5)
    low = img.resize((24, 16), Image.BICUBIC)
    up = low.resize(img.size, Image.BICUBIC)
    t = PairTransform(32, random_crop=True, hflip=True, resize_shorter=False)
    for seed in range(8):
        out = t({"key": "k", "image": img, "cond": low, "caption": ""}, random.Random(seed))
        ref = t({"key": "k", "image": img, "cond": up, "caption": ""}, random.Random(seed))
        torch.testing.assert_close(out["cond"], ref["cond"], rtol=0, atol=0)
        torch.testing.assert_close(out["image"], ref["image"], rtol=0, atol=0)
        target = (out["image"] + 1) / 2
        aligned = (out["cond"] - target).abs().mean()
        mirrored = (out["cond"].flip(-1) - target).abs().mean()
        shifted = (out["cond"].roll(3, -1) - target).abs().mean()
        assert aligned < 0.08 and aligned < min(mirrored, shifted)


@pytest.mark.parametrize(
    ("mode", "color", "fmt", "expected"),
    [
        ("L", 128, "PNG", (128, 128, 128)),
        ("LA", (0, 0), "PNG", (255, 255, 255)),  # transparent -> white background
        ("RGBA", (255, 0, 0, 255), "PNG", (255, 0, 0)),
        ("CMYK", (0, 255, 255, 0), "JPEG", (255, 0, 0)),
        ("I;16", 40000, "PNG", (156, 156, 156)),  # 16-bit scaled to 8-bit
        ("1", 1, "PNG", (255, 255, 255)),
    ],
)
def test_image_modes_keep_their_colours(mode, color, fmt, expected):
    data = encode(Image.new(mode, (8, 8), color), fmt)
    out = decode_sample({"__key__": "k", "png": data})
    assert out["image"].mode == "RGB"
    assert all(
        abs(a - b) <= 3 for a, b in zip(out["image"].getpixel((4, 4)), expected, strict=True)
    )


def test_palette_with_transparency():
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.info["transparency"] = 0
    out = decode_sample({"__key__": "k", "png": encode(pal, transparency=0)})
    assert out["image"].getpixel((0, 0)) == (0, 255, 0)


def test_too_large_is_skipped_before_decoding(tmp_path, monkeypatch):
    big = encode(Image.new("RGB", (1200, 1000), "red"))  # 1.2 MP, compresses to little
    loads = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1) or original(self))
    with pytest.raises(BadSample) as err:
        decode_sample({"__key__": "k", "png": big}, max_pixels=1_000_000)
    assert err.value.reason == "too_large" and not loads
    # a header claiming 8000 x 8000 with no pixel data: too large, not corrupt
    with pytest.raises(BadSample, match="too_large"):
        decode_sample({"__key__": "k", "png": png_header(8001, 8000)})
    shard = write_tar(tmp_path / "s.tar", {"a.png": big, "b.png": solid(), "c.png": solid(),
                                           "c.cond.png": big})  # fmt: skip
    keys, skipped = _val(_dm(str(shard), max_pixels=1_000_000))
    assert keys == ["b"] and skipped == {"too_large": 2}


@pytest.mark.parametrize(("width", "height"), [(10_000, 10_000), (20_000, 20_000)])
def test_pil_decompression_bomb_warning_and_error_become_skips(width, height):
    """Above PIL's own limit (a warning, then an error at twice it) even when max_pixels
    allows more."""
    with pytest.raises(BadSample) as err:
        decode_sample({"__key__": "k", "png": png_header(width, height)}, max_pixels=10**12)
    assert err.value.reason == "too_large"


def test_non_utf8_captions(tmp_path):
    shard = write_tar(tmp_path / "s.tar", {"a.png": solid(), "a.txt": "café".encode("latin-1"),
                                           "b.png": solid(), "b.txt": "naïve ok".encode()})  # fmt: skip
    batches = list(_dm(str(shard)).val_dataloader())
    assert [c for b in batches for c in b["caption"]] == ["caf\ufffd", "naïve ok"]
    keys, skipped = _val(_dm(str(shard), caption_errors="skip"))
    assert keys == ["b"] and skipped == {"caption_not_utf8": 1}


def test_size_filters_use_json_metadata_then_the_header(tmp_path):
    meta = {"width": 400, "height": 100}  # claims a 4:1 image; the pixels are 40 x 30
    shard = write_tar(tmp_path / "s.tar", {
        "a.png": solid(size=(40, 30)), "a.json": json.dumps(meta).encode(),
        "b.png": solid(size=(40, 30)),
        "c.png": solid(size=(16, 24)),
        "d.png": solid(size=(90, 30)), "d.json": b'{"caption_source": "none"}',
    })  # fmt: skip
    keys, skipped = _val(_dm(str(shard), max_aspect=2.0))
    assert keys == ["b", "c"] and skipped == {"aspect_ratio": 2}
    keys, skipped = _val(_dm(str(shard), min_size=20))
    assert keys == ["a", "b", "d"] and skipped == {"too_small": 1}


def test_any_json_failure_is_a_counted_skip(tmp_path):
    """Not JSON, nested past the parser's recursion limit, another type than an object,
    larger than 1 MB: each a ``corrupt_json`` skip, never a crash."""
    shard = write_tar(tmp_path / "s.tar", {
        "a.png": solid(), "a.json": b"not json",
        "b.png": solid(), "b.json": b"[" * 100_000 + b"]" * 100_000,
        "c.png": solid(), "c.json": b"[1, 2]",
        "d.png": solid(), "d.json": b'{"x": "' + b"y" * 1_000_001 + b'"}',
        "e.png": solid(), "e.json": b'{"width": 16, "height": 16}',
    })  # fmt: skip
    keys, skipped = _val(_dm(str(shard)))
    assert keys == ["e"] and skipped == {"corrupt_json": 4}


def test_all_bad_training_stream_raises_naming_the_shards(tmp_path):
    shard = write_tar(tmp_path / "bad-000000.tar", {f"s{i}.png": b"junk" for i in range(4)})
    dm = ShardDataModule(str(shard), resolution=16, batch_size=2, num_workers=0,
                         condition="sr", max_consecutive_skips=10)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"no valid sample.*bad-000000\.tar.*corrupt_image"):
        first_batch(dm)


def test_all_missing_shards_raise_instead_of_hanging(tmp_path):
    """No shard of the pattern exists: a config error, raised when the loader is built."""
    pattern = str(tmp_path / "gone-{000000..000002}.tar")
    dm = ShardDataModule(pattern, resolution=16, batch_size=2, num_workers=0,
                         condition="sr", max_consecutive_skips=20)  # fmt: skip
    with pytest.raises(MissingShardsError, match=r"none of the 3 shard files.*gone-000000\.tar"):
        first_batch(dm)


def test_empty_tar_raises_from_a_worker(tmp_path):
    shard = write_tar(tmp_path / "empty-000000.tar", {})
    dm = ShardDataModule(str(shard), resolution=16, batch_size=2, num_workers=1,
                         condition="sr", max_consecutive_skips=20)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"empty-000000\.tar.*empty_shard"):
        first_batch(dm)


def test_batches_carry_cumulative_skip_counts(tmp_path):
    shard = write_tar(tmp_path / "s.tar", {"a.png": b"junk", "b.png": solid(), "c.txt": b"x",
                                           "d.png": b"junk", "e.png": solid()})  # fmt: skip
    batches = list(_dm(str(shard)).val_dataloader())
    assert [b["skipped"] for b in batches] == [
        {"corrupt_image": 1},
        {"corrupt_image": 2, "no_target": 1},
    ]
    it = iter(ShardDataModule(str(shard), resolution=16, batch_size=2, num_workers=0,
                              condition="sr", shuffle_buffer=1).train_dataloader())  # fmt: skip
    counts = [sum(next(it)["skipped"].values()) for _ in range(3)]
    assert counts[0] >= 1 and counts == sorted(counts)  # cumulative per worker


def test_bad_filter_options():
    with pytest.raises(ValueError, match="max_aspect"):
        ShardDataModule("x.tar", max_aspect=0.5)
    with pytest.raises(ValueError, match="cond_mismatch"):
        ShardDataModule("x.tar", cond_mismatch="crop")


def test_stream_of_many_bad_samples_keeps_going_once_good_ones_came(tmp_path):
    members = {"a.png": solid()} | {f"b{i}.png": b"junk" for i in range(30)} | {"c.png": solid()}
    shard = write_tar(tmp_path / "s.tar", members)
    keys, skipped = _val(_dm(str(shard), max_consecutive_skips=5))
    assert keys == ["a", "c"] and skipped == {"corrupt_image": 30}


def test_decode_sample_keeps_old_call_signature():
    out = decode_sample({"__key__": "k", "jpg": solid(fmt="JPEG"), "txt": b" hi \n"})
    assert out["caption"] == "hi" and out["cond"] is None and out["mask"] is None
    assert io.BytesIO  # (keeps the import used)


# ---------------------------------------------------------------- predict folders


def _predict_folder(tmp_path):
    """Good images (one in a subfolder) among a truncated PNG, a text file named .png and
    an image above a 5000-pixel limit."""
    root = tmp_path / "inputs"
    (root / "photos").mkdir(parents=True)
    good = encode(structured((48, 48), seed=1))
    (root / "a_good.png").write_bytes(good)
    (root / "photos" / "bad.png").write_bytes(good[: len(good) // 2])  # truncated
    (root / "photos" / "notes.png").write_text("just some notes, not a picture\n")
    (root / "photos" / "z_good.png").write_bytes(encode(structured((48, 48), seed=2)))
    (root / "huge.png").write_bytes(encode(Image.new("RGB", (100, 100), "blue")))  # 10000 px
    return root


BAD_INPUTS = {
    "huge.png": "too large (100x100 pixels, above max_pixels=5000); raise data.max_pixels",
    "photos/bad.png": "not a readable image (truncated image)",
    "photos/notes.png": "not a readable image (cannot identify image file)",
}


def test_predict_folder_skips_bad_files_and_keeps_the_rest(tmp_path):
    dataset = ConditionFolder(str(_predict_folder(tmp_path)), max_pixels=5000)
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_conditions)
    batches = list(loader)  # a_good, huge | photos/bad, photos/notes | photos/z_good
    assert [b["name"] for b in batches] == [["a_good"], [], ["photos/z_good"]]
    assert batches[0]["cond"].shape == (1, 3, 48, 48) and batches[1]["cond"] is None
    assert batches[1]["caption"] == [] and batches[2]["skipped"] == []
    skipped = {s["name"]: s["detail"] for b in batches for s in b["skipped"]}
    assert skipped == BAD_INPUTS
    assert dataset[1] == {"name": "huge", "source": "huge.png", "reason": "too_large",
                          "error": BAD_INPUTS["huge.png"]}  # fmt: skip


def test_predict_folder_unreadable_file_is_named(tmp_path, monkeypatch):
    root = _predict_folder(tmp_path)
    original = Path.read_bytes

    def read_bytes(self):
        if self.name == "a_good.png":
            raise PermissionError(13, "Permission denied")
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    item = ConditionFolder(str(root))[0]
    assert item == {"name": "a_good", "source": "a_good.png", "reason": "unreadable",
                    "error": "unreadable file (Permission denied)"}  # fmt: skip


# ---------------------------------------------------------------- training skip messages


def test_training_skip_message_names_the_shard_and_the_key(tmp_path):
    shard = write_tar(tmp_path / "shard-000007.tar",
                      {"k1.png": b"plain text, not a picture", "k2.jpg": solid(fmt="JPEG")[:300],
                       "k3.png": solid(), "k3.cond.png": b"junk", "k4.png": solid()})  # fmt: skip
    stage = PairStage(PairTransform(16, recipe=None), seed=0, rank=0)
    samples = wds.DataPipeline(wds.SimpleShardList([str(shard)]), stage.read_shards)
    details = []
    stage.skip = lambda reason, detail="", url=None: details.append(detail)
    assert [s["key"] for s in stage(iter(samples))] == []  # k4: no condition stored
    assert details == [
        f"{shard} sample k1: k1.png is not a readable image (cannot identify image file)",
        f"{shard} sample k2: k2.jpg is not a readable image (truncated image)",
        f"{shard} sample k3: k3.cond.png is not a readable image (cannot identify image file)",
        f"{shard} sample k4: no cond.* member while data.condition=stored; store conditions "
        "in the shards or pick a recipe (data.condition=sr, inpaint, canny, ...)",
    ]


def test_training_skip_log_line_has_no_object_repr(tmp_path, caplog):
    shard = write_tar(tmp_path / "s.tar", {"a.png": solid(), "b.png": b"junk"})
    with caplog.at_level("WARNING", logger="codi_lightning.data.datamodule"):
        keys, skipped = _val(_dm(str(shard)))
    assert keys == ["a"] and skipped == {"corrupt_image": 1}
    assert f"last: corrupt_image: {shard} sample b: b.png is not a readable image (" in caplog.text
    assert "object at 0x" not in caplog.text


def test_bad_sample_error_names_the_sample():
    with pytest.raises(BadSample) as err:
        decode_sample({"__key__": "k", "__url__": "s.tar", "png": b"junk"})
    e = err.value
    assert (e.reason, e.where, e.detail) == (
        "corrupt_image", "s.tar sample k", "k.png is not a readable image (cannot identify image file)"
    )  # fmt: skip
    assert str(e) == f"corrupt_image: s.tar sample k: {e.detail}"


# ---------------------------------------------------------------- shard writers


def test_shards_of_an_all_bad_folder_leave_no_tar_and_name_the_files(tmp_path, capsys):
    root = tmp_path / "img"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "notes.png").write_text("not a picture")
    whole = solid(size=(64, 64))
    (root / "cut.png").write_bytes(whole[: len(whole) // 2])
    for i in range(11):
        (root / f"x{i:02d}.jpg").write_bytes(b"\xff\xd8 not a jpeg either")
    summary = write_shards(str(root), str(tmp_path / "out" / "s-%06d.tar"), progress=False)
    assert summary == {"written": 0, "skipped_unreadable": 13}
    assert not list((tmp_path / "out").iterdir())  # no empty tar
    out = capsys.readouterr().out
    assert "skipped 13 inputs:" in out
    assert "  cut.png (unreadable): not a readable image (" in out
    assert "  sub/notes.png (unreadable): not a readable image (cannot identify image file)" in out
    assert "x07.jpg" in out and "x08.jpg" not in out and "  ... and 3 more" in out
    assert "no shard written" in out and "fix or replace those files" in out


def test_edit_shards_name_the_bad_lines(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"nope")
    lines = [json.dumps({"source": "a.png", "edited": "gone.png", "instruction": "x"}),
             json.dumps({"source": "a.png", "edited": "a.png", "instruction": "x"})]  # fmt: skip
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    summary = write_edit_shards(str(tmp_path / "m.jsonl"), str(tmp_path / "e-%06d.tar"),
                                progress=False)  # fmt: skip
    assert summary == {"written": 0, "skipped_missing_file": 1, "skipped_unreadable": 1}
    assert not list(tmp_path.glob("*.tar"))
    out = capsys.readouterr().out
    assert "  line 1 (missing_file): no such file: gone.png" in out
    assert "  line 2 (unreadable): a.png is not a readable image (cannot identify" in out
