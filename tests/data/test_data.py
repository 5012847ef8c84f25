"""Shard writer, safe decoding, paired transforms and the DataModule."""

import io
import pickle
import tarfile

import pytest
import torch
import webdataset as wds
from PIL import Image

from codi_lightning.data import (
    PairTransform,
    ShardDataModule,
    decode_sample,
    float_pixels,
    write_shards,
)
from codi_lightning.data.transforms import collate, sr_bicubic


def _png(color=(255, 0, 0), size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_writer_stores_images_captions_conditions(tmp_path):
    imgs, conds = tmp_path / "img", tmp_path / "cond"
    (imgs / "sub").mkdir(parents=True)
    conds.joinpath("sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(imgs / "sub" / "a.b.png")
    (imgs / "sub" / "a.b.txt").write_text("a red square\n")
    Image.new("RGB", (40, 30), "blue").save(conds / "sub" / "a.b.jpg")
    Image.new("RGB", (20, 20), "green").save(imgs / "c.jpeg")  # no condition: skipped
    (imgs / "broken.png").write_bytes(b"not an image")
    summary = write_shards(
        str(imgs), str(tmp_path / "out-%06d.tar"), conditions=str(conds), progress=False
    )
    assert summary == {"written": 1, "skipped_no_condition": 1, "skipped_unreadable": 1}
    samples = list(wds.WebDataset(str(tmp_path / "out-000000.tar"), shardshuffle=False))
    assert len(samples) == 1
    s = samples[0]
    assert set(s) >= {"png", "cond.jpg", "txt", "json"}
    decoded = decode_sample(s)
    assert decoded["caption"] == "a red square"
    assert decoded["image"].size == (40, 30) and decoded["cond"].getpixel((0, 0))[2] > 200


def test_writer_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        write_shards(str(tmp_path / "missing"), str(tmp_path / "o-%06d.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="shard number field"):
        write_shards(str(tmp_path / "empty"), str(tmp_path / "o.tar"))
    with pytest.raises(FileNotFoundError, match="no jpg/jpeg/png/webp images"):
        write_shards(str(tmp_path / "empty"), str(tmp_path / "o-%06d.tar"))


def test_shards_subcommand(tmp_path):
    from codi_lightning.cli import main

    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "img" / "x.png")
    main(
        [
            "shards",
            "--images",
            str(tmp_path / "img"),
            "--output",
            str(tmp_path / "s-%06d.tar"),
            "--progress",
            "false",
        ]
    )
    assert (tmp_path / "s-000000.tar").is_file()


def test_pickle_members_are_never_loaded(tmp_path):
    """A `.pyd`/`.pickle`/`.pth` member that would run code when unpickled is not read."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = pickle.dumps(Evil())
    shard = tmp_path / "evil-000000.tar"
    _tar(shard, {"s0.png": _png(), "s0.pyd": payload, "s0.pickle": payload, "s0.pth": payload})
    dm = ShardDataModule(
        str(shard), str(shard), resolution=16, batch_size=1, num_workers=0, condition="sr"
    )
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (1, 3, 16, 16)
    assert not marker.exists()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_image_modes_decode_to_rgb(mode):
    color = {"L": 128, "RGBA": (255, 0, 0, 128), "P": 3, "CMYK": (0, 255, 0, 0), "I;16": 40000}[
        mode
    ]
    buf = io.BytesIO()
    Image.new(mode, (8, 8), color).save(buf, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    out = decode_sample({"__key__": "k", "png": buf.getvalue()})
    assert out["image"].mode == "RGB" and out["image"].size == (8, 8)


def test_paired_crop_is_identical_for_condition_and_target():
    import random

    g = torch.Generator().manual_seed(0)
    arr = (torch.rand(48, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(arr)
    t = PairTransform(32, random_crop=True, hflip=True, resize_shorter=False)
    for seed in range(5):
        out = t({"key": "k", "image": img, "cond": img.copy(), "caption": "c"}, random.Random(seed))
        torch.testing.assert_close(out["cond"], (out["image"] + 1) / 2, atol=1e-6, rtol=0)
        assert out["image"].shape == (3, 32, 32)


def test_sr_condition_is_derived_from_the_crop():
    import random

    img = Image.new("RGB", (64, 64), "white")
    img.paste(Image.new("RGB", (32, 64), "black"))
    t = PairTransform(
        32, random_crop=False, resize_shorter=False, recipe=lambda im, rng: sr_bicubic(im, 4)
    )
    out = t({"key": "k", "image": img, "cond": None, "caption": "c"}, random.Random(0))
    expected = sr_bicubic(img.crop((16, 16, 48, 48)), 4)
    from codi_lightning.data.transforms import to_tensor01

    torch.testing.assert_close(out["cond"], to_tensor01(expected))
    assert out["cond"].min() >= 0 and out["image"].min() >= -1


def test_datamodule_train_batches(tiny_shards):
    dm = ShardDataModule(tiny_shards["train"], tiny_shards["val"], resolution=32, batch_size=4,
                         num_workers=0, condition="sr", caption_dropout=1.0)  # fmt: skip
    it = iter(dm.train_dataloader())
    for _ in range(10):  # resampled: more batches than one pass over the data
        batch = next(it)
    assert batch["image"].dtype == batch["cond"].dtype == torch.uint8  # floats on the device
    batch = float_pixels(batch)
    assert batch["image"].shape == (4, 3, 32, 32) and batch["cond"].shape == (4, 3, 32, 32)
    assert -1 <= batch["image"].min() and batch["image"].max() <= 1
    assert 0 <= batch["cond"].min() and batch["cond"].max() <= 1
    assert batch["caption"] == [""] * 4  # dropout 1.0


def test_datamodule_val_sees_every_sample_once(tiny_shards):
    dm = ShardDataModule(tiny_shards["train"], tiny_shards["val"], resolution=32, batch_size=3,
                         num_workers=0, condition="sr")  # fmt: skip
    keys = [k for b in dm.val_dataloader() for k in b["key"]]
    assert len(keys) == 10 and len(set(keys)) == 10
    captions = [c for b in dm.val_dataloader() for c in b["caption"]]
    assert all(captions)  # no caption dropout outside training


def test_stored_condition_required_and_skipped_when_missing(tmp_path):
    shard = tmp_path / "c-000000.tar"
    _tar(shard, {"a.png": _png(), "a.cond.png": _png((0, 0, 255)), "b.png": _png()})
    dm = ShardDataModule(
        str(shard), str(shard), resolution=16, batch_size=4, num_workers=0, condition="stored"
    )
    batches = list(dm.val_dataloader())
    assert [k for b in batches for k in b["key"]] == ["a"]
    assert dm.stages["val"].skipped == {"no_condition": 1}
    assert float_pixels(batches[0])["cond"][0, 2].mean() > 0.9  # the stored blue condition


def test_collate_keeps_captions_as_list():
    s = {"image": torch.zeros(3, 4, 4), "cond": torch.zeros(3, 4, 4), "caption": "x", "key": "k"}
    out = collate([s, s])
    assert out["caption"] == ["x", "x"] and out["image"].shape == (2, 3, 4, 4)


def test_bad_datamodule_config():
    with pytest.raises(ValueError, match="choose 'stored' or 'sr'"):
        ShardDataModule("x.tar", condition="depth")
    with pytest.raises(ValueError, match="caption_dropout"):
        ShardDataModule("x.tar", caption_dropout=2)


def test_training_stream_is_reseeded_from_the_global_step(tiny_shards):
    """Resume does not replay: the stream depends on the global step at loader creation
    (reproducible for the same step, different for another)."""
    from types import SimpleNamespace

    def first_keys(step):
        dm = ShardDataModule(tiny_shards["train"], resolution=32, batch_size=4, num_workers=0,
                             condition="sr", shuffle_buffer=16)  # fmt: skip
        dm.trainer = SimpleNamespace(global_rank=0, global_step=step)
        it = iter(dm.train_dataloader())
        return [k for _ in range(3) for k in next(it)["key"]]

    assert first_keys(0) == first_keys(0)
    assert first_keys(0) != first_keys(500)


def test_uint8_batches_reach_the_module_as_floats_through_the_trainer(tiny_shards):
    """The loaders ship uint8 pixels; the trainer hands the module floats (image in
    [-1, 1], cond in [0, 1]) converted after the transfer, equal to the longhand
    conversion of the shipped bytes."""
    import lightning as L

    seen = []

    class Recorder(L.LightningModule):
        def validation_step(self, batch, batch_idx):
            seen.append(batch)

    dm = ShardDataModule(tiny_shards["train"], tiny_shards["val"], resolution=32, batch_size=5,
                         num_workers=0, condition="sr")  # fmt: skip
    shipped = list(dm.val_dataloader())
    assert shipped[0]["image"].dtype == shipped[0]["cond"].dtype == torch.uint8
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.validate(Recorder(), datamodule=dm)
    assert len(seen) == len(shipped) == 2
    for got, raw in zip(seen, shipped, strict=True):
        assert got["key"] == raw["key"]
        assert got["image"].dtype == got["cond"].dtype == torch.float32
        torch.testing.assert_close(got["image"], raw["image"].double().div(127.5).sub(1).float())
        torch.testing.assert_close(got["cond"], raw["cond"].double().div(255).float())


def test_collate_keeps_channels_last_pixels_in_their_layout():
    """uint8 crops lying channels-last in memory are stacked without transposing them;
    the values are those of a plain stack, and float_pixels gives contiguous floats."""
    crops = [torch.randint(0, 256, (20, 30, 3), dtype=torch.uint8).permute(2, 0, 1)[:, :, 5:25]
             for _ in range(3)]  # fmt: skip
    flipped = crops[1].flip(-1)
    samples = [{"image": x, "cond": x, "caption": "", "key": str(i)}
               for i, x in enumerate([crops[0], flipped, crops[2]])]  # fmt: skip
    batch = collate(samples)
    assert torch.equal(batch["image"], torch.stack([crops[0], flipped, crops[2]]))
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    floats = float_pixels(batch)
    assert floats["image"].is_contiguous() and floats["cond"].is_contiguous()
    torch.testing.assert_close(floats["cond"], batch["cond"].float() / 255)


def test_uint8_batches_fed_past_the_data_module_stop_with_the_fix(tiny_shards, tiny_teacher):
    """A loader's uint8 batch handed to the module without the data module's conversion
    (a Trainer given the loaders alone) is refused with the way to fix it, not trained on
    as pixel values in [0, 255]."""
    from codi_lightning.training import CoDiDistillation

    dm = ShardDataModule(tiny_shards["train"], resolution=32, batch_size=2, num_workers=0,
                         condition="sr")  # fmt: skip
    batch = next(iter(dm.train_dataloader()))
    model = CoDiDistillation(str(tiny_teacher), num_grid=10)
    with pytest.raises(TypeError, match="float_pixels"):
        model.compute_loss(batch, torch.Generator().manual_seed(0))
    loss, _ = model.compute_loss(float_pixels(batch), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("rank,world,workers", [(0, 1, 2), (0, 2, 1), (1, 2, 1), (1, 3, 1),
                                                (2, 3, 0)])  # fmt: skip
def test_eval_workers_only_for_the_shards_a_rank_gets(tiny_shards, monkeypatch, rank, world,
                                                      workers):  # fmt: skip
    """Two shards over ``world`` ranks, 2 workers asked: a rank starts one worker per shard
    it gets (webdataset deals them as urls[rank::world]), none where it gets no shard."""
    dm = ShardDataModule(tiny_shards["train"], tiny_shards["train"], resolution=32,
                         batch_size=2, num_workers=2)  # fmt: skip
    monkeypatch.setattr(dm, "_rank_and_step", lambda: (rank, 0))
    monkeypatch.setattr(dm, "_world", lambda: world)
    assert dm.val_dataloader().loader.num_workers == workers
