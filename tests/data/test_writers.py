"""Shard writers: condition recipes, instructed-editing manifests, summaries; the
predict image writer."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from data_helpers import structured
from jsonargparse import CLI
from PIL import Image

from codi_lightning.data import (
    ShardDataModule,
    decode_sample,
    float_pixels,
    write_edit_shards,
    write_shards,
)
from codi_lightning.data.recipes import INPAINT_FILL
from codi_lightning.data.transforms import sr_bicubic, to_tensor01
from codi_lightning.training import ImageWriter


def _folder(tmp_path, n=3, size=(64, 48)):
    root = tmp_path / "img"
    root.mkdir()
    for i in range(n):
        structured(size, seed=i).save(root / f"im{i}.png")
    return root


def _samples(pattern: str) -> list[dict]:
    return list(wds.WebDataset(pattern, shardshuffle=False))


def test_sr_recipe_stores_the_low_resolution_input(tmp_path, capsys):
    root = _folder(tmp_path)
    summary = write_shards(str(root), str(tmp_path / "sr-%06d.tar"), recipe="sr", sr_factor=4,
                           progress=False)  # fmt: skip
    assert summary == {"written": 3}
    assert '"written": 3' in capsys.readouterr().out
    s = _samples(str(tmp_path / "sr-000000.tar"))[0]
    decoded = decode_sample(s)
    assert decoded["cond"].size == (16, 12) and decoded["image"].size == (64, 48)
    meta = json.loads(s["json"])
    assert meta["cond"] == {"recipe": "sr", "seed": 0, "width": 16, "height": 12, "sr_factor": 4}
    # the data module scales it back up: the same condition as the on-the-fly recipe
    shard = str(tmp_path / "sr-000000.tar")
    dm = ShardDataModule(shard, shard, resolution=48, batch_size=3, num_workers=0,
                         condition="stored", resize_shorter=False)  # fmt: skip
    batch = float_pixels(next(iter(dm.val_dataloader())))
    img = structured((64, 48), seed=0)
    expected = sr_bicubic(img, 4).crop((8, 0, 56, 48))
    torch.testing.assert_close(batch["cond"][0], to_tensor01(expected), atol=0, rtol=0)


def test_realesrgan_recipe_is_seeded_per_sample(tmp_path):
    root = _folder(tmp_path, n=2)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_shards(str(root), str(tmp_path / f"{name}-%06d.tar"), recipe="sr_realesrgan",
                     sr_factor=2, seed=seed, progress=False)  # fmt: skip
    a, b, c = (_samples(str(tmp_path / f"{n}-000000.tar")) for n in "abc")
    assert [s["cond.png"] for s in a] == [s["cond.png"] for s in b]
    assert a[0]["cond.png"] != c[0]["cond.png"]
    assert Image.open(io.BytesIO(a[0]["cond.png"])).size == (32, 24)


def test_inpaint_and_canny_recipes(tmp_path):
    root = _folder(tmp_path, n=2)
    write_shards(str(root), str(tmp_path / "in-%06d.tar"), recipe="inpaint", progress=False)
    write_shards(str(root), str(tmp_path / "ca-%06d.tar"), recipe="canny", progress=False)
    s = _samples(str(tmp_path / "in-000000.tar"))[0]
    assert {"png", "cond.png", "mask.png", "json"} <= set(s)
    shard = str(tmp_path / "in-000000.tar")
    dm = ShardDataModule(shard, shard, resolution=48, batch_size=2, num_workers=0,
                         condition="stored", resize_shorter=False)  # fmt: skip
    batch = float_pixels(next(iter(dm.val_dataloader())))
    assert batch["mask"].shape == (2, 1, 48, 48)
    masked = batch["mask"][0, 0] > 0.5
    assert masked.any() and torch.allclose(batch["cond"][0][:, masked], torch.tensor(INPAINT_FILL[0] / 255))  # fmt: skip
    edges = decode_sample(_samples(str(tmp_path / "ca-000000.tar"))[0])["cond"]
    assert edges.size == (64, 48) and set(np.unique(np.asarray(edges))) <= {0, 255}


def test_writer_recipe_errors_and_skips(tmp_path):
    root = _folder(tmp_path, n=2)
    Image.new("RGB", (1100, 1000)).save(root / "big.png")
    (root / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match="not both"):
        write_shards(str(root), str(tmp_path / "x-%06d.tar"), conditions=str(root), recipe="sr")
    with pytest.raises(ValueError, match="integer >= 2"):
        write_shards(str(root), str(tmp_path / "x-%06d.tar"), recipe="sr", sr_factor=0)
    summary = write_shards(str(root), str(tmp_path / "ok-%06d.tar"), recipe="canny",
                           max_pixels=1_000_000, progress=False)  # fmt: skip
    assert summary == {"written": 2, "skipped_too_large": 1, "skipped_unreadable": 1}


def _manifest(tmp_path) -> str:
    (tmp_path / "pics").mkdir()
    structured((40, 32), seed=1).save(tmp_path / "pics" / "src.png")
    structured((40, 32), seed=2).save(tmp_path / "pics" / "out.jpg")
    (tmp_path / "pics" / "broken.png").write_bytes(b"nope")
    good = {"source": "pics/src.png", "edited": "pics/out.jpg", "instruction": " make it blue "}
    lines = [
        json.dumps(good),
        "",
        "{not json",
        json.dumps({"source": "pics/src.png", "edited": "pics/out.jpg"}),
        json.dumps({**good, "instruction": "  "}),
        json.dumps({**good, "edited": "pics/missing.png"}),
        json.dumps({**good, "source": "pics/broken.png"}),
        json.dumps({**good, "instruction": "add a hat"}),
    ]
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_edit_manifest_to_shards(tmp_path, capsys):
    out = str(tmp_path / "shards" / "edit-%06d.tar")
    summary = write_edit_shards(_manifest(tmp_path), out, progress=False)
    assert summary == {"written": 2, "skipped_bad_line": 2, "skipped_no_instruction": 1,
                       "skipped_missing_file": 1, "skipped_unreadable": 1}  # fmt: skip
    assert "skipped_bad_line" in capsys.readouterr().out
    samples = _samples(str(tmp_path / "shards" / "edit-000000.tar"))
    assert [s["txt"].decode() for s in samples] == ["make it blue", "add a hat"]
    s = samples[0]
    assert {"jpg", "cond.png", "txt", "json"} <= set(s)
    decoded = decode_sample(s)
    src = np.asarray(structured((40, 32), seed=1))
    assert np.array_equal(np.asarray(decoded["cond"]), src)  # the source is the condition
    meta = json.loads(s["json"])
    assert meta["source"] == "pics/src.png" and meta["edited"] == "pics/out.jpg"
    assert (meta["width"], meta["height"]) == (40, 32)
    shard = str(tmp_path / "shards" / "edit-000000.tar")
    dm = ShardDataModule(shard, shard, resolution=32, batch_size=2, num_workers=0)
    batch = float_pixels(next(iter(dm.val_dataloader())))
    assert batch["caption"] == ["make it blue", "add a hat"] and batch["skipped"] == {}


def test_edit_writer_errors_and_cli(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a file"):
        write_edit_shards(str(tmp_path / "none.jsonl"), str(tmp_path / "e-%06d.tar"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no entries"):
        write_edit_shards(str(tmp_path / "empty.jsonl"), str(tmp_path / "e-%06d.tar"))
    with pytest.raises(ValueError, match="shard number field"):
        write_edit_shards(_manifest(tmp_path), str(tmp_path / "e.tar"))
    summary = CLI(write_edit_shards, as_positional=False, args=[
        "--manifest", str(tmp_path / "edits.jsonl"), "--output", str(tmp_path / "c-%06d.tar"),
        "--progress", "false"])  # fmt: skip
    assert summary["written"] == 2


def test_shards_cli_accepts_the_recipe_options(tmp_path):
    root = _folder(tmp_path, n=1)
    summary = CLI(write_shards, as_positional=False, args=[
        "--images", str(root), "--output", str(tmp_path / "r-%06d.tar"), "--recipe",
        "sr_realesrgan", "--sr_factor", "8", "--seed", "3", "--progress", "false"])  # fmt: skip
    assert summary == {"written": 1}
    with pytest.raises(SystemExit):
        CLI(write_shards, as_positional=False, args=[
            "--images", str(root), "--output", str(tmp_path / "r-%06d.tar"), "--recipe", "depth"])  # fmt: skip


def test_parquet_manifest_gives_the_same_shards_as_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = Path(_manifest(tmp_path))
    rows = []
    for line in jsonl.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and all(
            isinstance(row.get(k), str) for k in ("source", "edited", "instruction")
        ):
            rows.append(row)
    table = pa.Table.from_pylist(rows)
    parquet = jsonl.with_suffix(".parquet")
    pq.write_table(table, parquet)
    a = write_edit_shards(str(jsonl), str(tmp_path / "j-%06d.tar"), progress=False)
    b = write_edit_shards(str(parquet), str(tmp_path / "p-%06d.tar"), progress=False)
    assert a["written"] == b["written"] == 2
    ja, pb = _samples(str(tmp_path / "j-000000.tar")), _samples(str(tmp_path / "p-000000.tar"))
    assert [s["txt"] for s in ja] == [s["txt"] for s in pb]
    assert [s["jpg"] for s in ja] == [s["jpg"] for s in pb]


# ---------------------------------------------------------------- predict image writer


class _Strategy:
    """Stands in for a 2-process strategy: ``reduce`` adds the other rank's counts
    (written, then skipped per reason: not_an_image_file, unreadable, too_large, other)."""

    root_device = torch.device("cpu")

    def __init__(self, other_rank: torch.Tensor) -> None:
        self.other_rank, self.calls, self.barriers = other_rank, 0, 0

    def reduce(self, tensor, reduce_op="mean"):
        assert reduce_op == "sum"
        self.calls += 1
        return tensor + self.other_rank

    def barrier(self, name=None):
        self.barriers += 1


class _Trainer:
    def __init__(self, rank: int, other_rank=(0, 0, 0, 0, 0)) -> None:
        self.is_global_zero = rank == 0
        self.strategy = _Strategy(torch.tensor(other_rank))


def _predict(writer, trainer, images, names, **extra):
    writer.write_on_batch_end(trainer, None, {"images": images, "names": names, **extra},
                              None, None, 0)  # fmt: skip


def test_image_writer_names_skipped_inputs_and_sums_the_ranks(tmp_path, capsys):
    rank0 = _Trainer(0, other_rank=(3, 0, 1, 0, 0))  # rank 1 wrote 3, skipped 1 unreadable
    writer = ImageWriter(str(tmp_path / "out"))
    writer.on_predict_start(rank0, None)
    assert rank0.strategy.barriers == 1  # every rank waits for rank 0's clean-up
    bad = [{"name": "photos/bad.png", "reason": "unreadable",
            "detail": "not a readable image (truncated image)"}]  # fmt: skip
    _predict(writer, rank0, torch.rand(2, 3, 8, 8), ["a", "sub/b"], skipped=bad)
    _predict(writer, rank0, torch.rand(0, 3, 8, 8), [],
             skipped=[{"name": "huge.png", "reason": "too_large", "detail": "too large"}])  # fmt: skip
    _predict(writer, rank0, [torch.rand(3, 8, 8), torch.rand(3, 4, 6)], ["c", "d"])  # sizes
    out = capsys.readouterr().out
    assert "skipped photos/bad.png: not a readable image (truncated image)\n" in out
    assert "skipped huge.png: too large\n" in out
    written = {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*")}
    assert written == {"a.png", "c.png", "d.png", "sub", "sub/b.png"}  # no partial file left
    assert writer.written == 4 and [s["name"] for s in writer.skipped] == ["photos/bad.png",
                                                                           "huge.png"]  # fmt: skip
    writer.on_predict_end(rank0, None)
    assert capsys.readouterr().out == (
        f"wrote 7 images to {tmp_path / 'out'}; skipped 3 inputs (2 unreadable, 1 too_large), "
        "named above\n"
    )
    assert rank0.strategy.calls == 1


def test_image_writer_reduces_on_every_rank_and_prints_on_rank_zero(tmp_path, capsys):
    rank1 = _Trainer(1, other_rank=(5, 0, 0, 0, 0))
    writer = ImageWriter(str(tmp_path / "out"))
    writer.on_predict_start(rank1, None)
    assert rank1.strategy.barriers == 1
    _predict(writer, rank1, torch.rand(0, 3, 8, 8), [], skipped=[])  # padding: nothing
    writer.on_predict_end(rank1, None)
    assert rank1.strategy.calls == 1  # the collective runs here too, or rank 0 would hang
    assert capsys.readouterr().out == "" and not (tmp_path / "out").exists()
    rank0 = _Trainer(0)
    writer = ImageWriter(str(tmp_path / "out"))
    writer.on_predict_end(rank0, None)
    assert capsys.readouterr().out == f"wrote 0 images to {tmp_path / 'out'}\n"


# ---------------------------------------------------------------- atomic, tolerant writers


def test_a_killed_shard_writer_leaves_no_truncated_shard_and_a_rerun_clears_it(tmp_path, capsys):
    """A shard is written under a partial name and renamed when complete: a writer killed
    mid-shard (never closed) leaves completed shards and a partial file, no truncated tar
    under a shard's name; the next run removes the partial file and says so."""
    from codi_lightning.data.shards import shard_writer

    pattern = str(tmp_path / "out" / "s-%06d.tar")
    (tmp_path / "out").mkdir()
    sink = shard_writer(pattern, maxcount=2)
    for i in range(3):  # shard 0 complete, shard 1 half written
        sink.write({"__key__": f"k{i}", "txt": "x" * 1000})
    sink.tarstream.stream.flush()  # bytes on disk, as a killed process leaves them
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [".s-000001.tar.partial", "s-000000.tar"]
    assert len(_samples(str(tmp_path / "out" / "s-000000.tar"))) == 2
    write_shards(str(_folder(tmp_path)), pattern, maxcount=2, progress=False)
    assert "removed 1 partial shard(s) of an interrupted run" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["s-000000.tar", "s-000001.tar"]


def _tar(path, members):
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_cache_tolerates_what_training_tolerates_and_writes_safe_names(tmp_path, tiny_teacher,
                                                                       capsys):  # fmt: skip
    """Duplicate members (that sample skipped, counted), an empty shard (nothing written,
    no empty tar left), member names that climb out of the folder or are absolute
    (written relative)."""
    from codi_lightning.data import write_cached_shards

    png = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(png, format="PNG")
    png = png.getvalue()
    dup = _tar(tmp_path / "dup.tar", [("a.png", png), ("a.png", png), ("b.png", png)])
    empty = _tar(tmp_path / "empty.tar", [])
    evil = _tar(tmp_path / "evil.tar", [("../../x.png", png), ("/abs/path.png", png)])
    kw = {"resolution": 32, "progress": False}
    counts = write_cached_shards(str(tiny_teacher), dup, str(tmp_path / "d" / "c-%06d.tar"), **kw)
    assert counts == {"written": 1, "skipped_duplicate_member": 1}
    counts = write_cached_shards(str(tiny_teacher), empty, str(tmp_path / "e" / "c-%06d.tar"), **kw)
    assert counts == {"written": 0} and list((tmp_path / "e").iterdir()) == []
    assert "no shard written" in capsys.readouterr().out
    write_cached_shards(str(tiny_teacher), evil, str(tmp_path / "v" / "c-%06d.tar"), **kw)
    import tarfile

    with tarfile.open(tmp_path / "v" / "c-000000.tar") as tar:
        names = tar.getnames()
    assert sorted({n.split(".")[0] for n in names}) == ["abs/path", "x"]
    assert not any(n.startswith("/") or ".." in n for n in names)
