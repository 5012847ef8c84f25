"""Shard sources: local paths, brace patterns, ``pipe:`` URLs, weighted mixing."""

from collections import Counter

import pytest
from data_helpers import first_batch, solid, write_tar
from jsonargparse import ArgumentParser

from codi_lightning.data import PairStage, PairTransform, ShardDataModule
from codi_lightning.data.datamodule import MissingShardsError, expand_shards, shard_sources


def _shards(tmp_path, prefix: str, n_shards: int = 2, per_shard: int = 4) -> str:
    for s in range(n_shards):
        members = {f"{prefix}{s}_{i}.png": solid((40 * i, 80, 160)) for i in range(per_shard)}
        write_tar(tmp_path / f"{prefix}-{s:06d}.tar", members)
    return str(tmp_path / f"{prefix}-{{000000..{n_shards - 1:06d}}}.tar")


def _train_keys(dm: ShardDataModule, batches: int) -> list[str]:
    it = iter(dm.train_dataloader())
    return [k for _ in range(batches) for k in next(it)["key"]]


def _dm(train, **kw) -> ShardDataModule:
    kw = {"resolution": 8, "batch_size": 8, "num_workers": 0, "condition": "sr",
          "shuffle_buffer": 1, **kw}  # fmt: skip
    return ShardDataModule(train, kw.pop("val", None), **kw)


def test_pipe_urls_for_training_and_validation(tmp_path):
    write_tar(tmp_path / "p.tar", {"x.png": solid(), "y.png": solid((0, 255, 0))})
    url = f"pipe:cat {tmp_path / 'p.tar'}"
    dm = _dm(url, val=url, val_batch_size=4)
    assert [k for b in dm.val_dataloader() for k in b["key"]] == ["x", "y"]
    assert set(_train_keys(dm, 2)) == {"x", "y"}


def test_failing_pipe_is_counted(tmp_path):
    write_tar(tmp_path / "p.tar", {"x.png": solid()})
    urls = [f"pipe:cat {tmp_path / 'p.tar'}", f"pipe:cat {tmp_path / 'missing.tar'}"]
    dm = _dm(urls, val=urls)
    assert [k for b in dm.val_dataloader() for k in b["key"]] == ["x"]
    assert dm.stages["val"].skipped == {"unreadable_shard": 1}


def test_brace_patterns_inside_lists_are_expanded(tmp_path):
    a, b = _shards(tmp_path, "a"), _shards(tmp_path, "b", n_shards=1)
    assert len(expand_shards([a, b])) == 3
    assert expand_shards("x-{0..1}.tar::y.tar") == ["x-0.tar", "x-1.tar", "y.tar"]
    dm = _dm([a, b], val=[a, b])
    assert len([k for batch in dm.val_dataloader() for k in batch["key"]]) == 12


def test_weighted_mix_follows_the_weights_and_is_seeded(tmp_path):
    sources = [{"shards": _shards(tmp_path, "a"), "weight": 3.0},
               {"shards": _shards(tmp_path, "b"), "weight": 1.0}]  # fmt: skip
    keys = _train_keys(_dm(sources, seed=1), 40)
    share = Counter(k[0] for k in keys)["a"] / len(keys)
    assert 0.65 < share < 0.85  # 0.75 expected; 320 draws
    assert keys == _train_keys(_dm(sources, seed=1), 40)
    assert keys != _train_keys(_dm(sources, seed=2), 40)


def test_a_dead_source_in_a_mix_raises_instead_of_hanging(tmp_path):
    for i in range(4):  # shards that exist but cannot be read
        (tmp_path / f"dead-{i}.tar").write_bytes(b"this is not a tar file" * 40)
    sources = [{"shards": _shards(tmp_path, "a"), "weight": 1.0},
               {"shards": str(tmp_path / "dead-{0..3}.tar"), "weight": 1.0}]  # fmt: skip
    dm = _dm(sources, max_consecutive_skips=8)
    with pytest.raises(RuntimeError, match=r"dead-\d\.tar.*corrupt_shard"):
        first_batch(dm)


def test_a_missing_source_in_a_mix_is_named_before_reading(tmp_path):
    """No file of one source exists: a config error naming it, when the loader is built."""
    sources = [{"shards": _shards(tmp_path, "a"), "weight": 1.0},
               {"shards": str(tmp_path / "gone-{0..3}.tar"), "weight": 1.0}]  # fmt: skip
    with pytest.raises(MissingShardsError, match=r"none of the 4 shard files exists.*gone-0\.tar"):
        _dm(sources).train_dataloader()


def test_shard_guard_raises_even_after_good_samples(tmp_path):
    """A source whose shards all fail stops the stream although others gave samples."""
    stage = PairStage(PairTransform(8), seed=0, rank=0, max_consecutive_skips=5)
    stage.good = 100
    dead = ({"url": str(tmp_path / f"dead-{i % 2}.tar")} for i in range(1000))
    with pytest.raises(RuntimeError, match=r"5 shards in a row gave no sample.*dead-0\.tar"):
        list(stage.read_shards(dead))
    assert stage.skipped == {"unreadable_shard": 5}


def test_source_spec_errors():
    with pytest.raises(ValueError, match="is empty"):
        shard_sources([])
    with pytest.raises(ValueError, match="one kind"):
        shard_sources(["a.tar", {"shards": "b.tar", "weight": 1.0}])
    with pytest.raises(ValueError, match="must be > 0"):
        shard_sources([{"shards": "b.tar", "weight": 0}])
    with pytest.raises(ValueError, match="'shards' and 'weight'"):
        ShardDataModule([{"shard": "b.tar", "weight": 1}])


def test_weighted_sources_parse_from_config():
    parser = ArgumentParser()
    parser.add_class_arguments(ShardDataModule, "data")
    cfg = parser.parse_string(
        "data:\n  train_shards:\n    - {shards: 'a-{0..3}.tar', weight: 2}\n"
        "    - {shards: [b.tar, c.tar], weight: 0.5}\n  condition: sr_realesrgan\n"
        "  max_aspect: 2.0\n  cond_mismatch: skip\n"
    )
    assert cfg.data.train_shards == [{"shards": "a-{0..3}.tar", "weight": 2.0},
                                     {"shards": ["b.tar", "c.tar"], "weight": 0.5}]  # fmt: skip
    sources = shard_sources(cfg.data.train_shards)
    assert [len(u) for u, _ in sources] == [4, 2] and [w for _, w in sources] == [2.0, 0.5]
    assert parser.parse_string("data: {train_shards: 'pipe:cat a.tar'}").data.train_shards == (
        "pipe:cat a.tar"
    )
