"""A LightningDataModule streaming WebDataset shards of (condition, image, caption).

Shard format (see docs/data.md): each sample has a target image (``jpg``/``png``/
``webp``), optionally a condition (``cond.png``/``cond.jpg``), a caption (``txt``) and
metadata (``json``). Training streams are resampled (infinite; train by
``trainer.max_steps``); validation streams are read once, split across ranks and workers.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterator
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from .decode import BadSample, decode_sample, select_member
from .folder import ConditionFolder, collate_conditions
from .transforms import PairTransform, collate, make_recipe

log = logging.getLogger(__name__)


def _worker_seed(rank: int) -> int:
    info = get_worker_info()
    return rank * 1000 + (info.id if info is not None else 0)


class PairStage:
    """Pipeline stage: decode safely, transform, skip bad samples counting the reason."""

    def __init__(self, transform: PairTransform, seed: int, rank: int) -> None:
        self.transform, self.seed, self.rank = transform, seed, rank
        self.skipped: Counter[str] = Counter()

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rng = random.Random(hash((self.seed, _worker_seed(self.rank))))
        for raw in src:
            try:
                yield self.transform(decode_sample(raw), rng)
            except BadSample as err:
                self.skipped[err.reason] += 1
                if self.skipped.total() in (1, 10, 100, 1000) or self.skipped.total() % 10000 == 0:
                    log.warning("skipped %s bad samples so far %s; last: %s",
                                self.skipped.total(), dict(self.skipped), err)  # fmt: skip


class ShardDataModule(L.LightningDataModule):
    """WebDataset shards -> batches ``{"image": [-1, 1], "cond": [0, 1], "caption": [str]}``.

    Args:
        train_shards: shard URLs: a brace pattern (``data/train-{000000..000099}.tar``),
            a list, or a ``pipe:`` command.
        val_shards: shards for validation/test (read once, not resampled).
        resolution: crop size in pixels (the target's resolution).
        batch_size: per-process batch size.
        val_batch_size: per-process validation batch size (default: ``batch_size``).
        num_workers: DataLoader workers per process.
        condition: ``stored`` (read ``cond.*``) or ``sr`` (derive a bicubic
            super-resolution condition when none is stored).
        sr_factor: downscaling factor of the ``sr`` recipe.
        caption_dropout: probability of an empty caption in training (for guidance).
        hflip: random horizontal flips in training.
        resize_shorter: scale the shorter side to ``resolution`` before cropping.
        shuffle_buffer: samples in the shuffle buffer.
        seed: base seed; the training stream is reseeded from the global step on
            resume, so a resumed run does not replay the samples it saw.
        predict_images: folder of condition images for ``predict``.
        predict_prompt: prompt for images without a side ``<stem>.txt``.
        predict_upscale: scale factor applied to predict inputs (4 for 4x SR).
        predict_multiple: predict inputs are resized to multiples of this (64 for SD).
        predict_batch_size: images per predict batch (same-size images only).
        predict_output: folder for predicted images (default:
            ``<trainer.default_root_dir>/predictions``).
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        resolution: int = 512,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        condition: Literal["stored", "sr"] = "stored",
        sr_factor: int = 4,
        caption_dropout: float = 0.1,
        hflip: bool = False,
        resize_shorter: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        predict_images: str | None = None,
        predict_prompt: str = "",
        predict_upscale: int = 1,
        predict_multiple: int = 64,
        predict_batch_size: int = 1,
        predict_output: str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"data.caption_dropout={caption_dropout} must lie in [0, 1]")
        make_recipe(condition, sr_factor)  # validates the name
        self.save_hyperparameters()
        self.train_shards, self.val_shards = train_shards, val_shards
        self.resolution, self.batch_size = resolution, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.stages: dict[str, PairStage] = {}

    def _rank_and_step(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.global_step
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), 0
        return 0, 0

    def _transform(self, train: bool) -> PairTransform:
        hp = self.hparams
        return PairTransform(
            hp.resolution,
            random_crop=train,
            hflip=hp.hflip and train,
            resize_shorter=hp.resize_shorter,
            recipe=make_recipe(hp.condition, hp.sr_factor),
            caption_dropout=hp.caption_dropout if train else 0.0,
        )

    def _loader(self, dataset: wds.DataPipeline, workers: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        if not self.train_shards:
            raise ValueError("data.train_shards is empty: give shard paths to train on")
        rank, step = self._rank_and_step()
        seed = self.hparams.seed + step  # reseed from the global step: no replay on resume
        stage = PairStage(self._transform(train=True), seed, rank)
        self.stages["train"] = stage
        pipeline = wds.DataPipeline(
            wds.ResampledShards(
                self.train_shards,
                seed=seed,
                deterministic=True,
                worker_seed=partial(_worker_seed, rank),
            ),  # fmt: skip
            wds.tarfile_to_samples(handler=wds.warn_and_continue, select_files=select_member),
            wds.detshuffle(
                self.hparams.shuffle_buffer, min(100, self.hparams.shuffle_buffer), seed=seed + rank
            ),
            stage,
            wds.batched(self.batch_size, collation_fn=collate, partial=False),
        )
        return self._loader(pipeline, self.num_workers)

    def _eval_dataloader(self, name: str) -> DataLoader:
        if not self.val_shards:
            raise ValueError(f"data.val_shards is empty: give shard paths for {name}")
        rank, _ = self._rank_and_step()
        stage = PairStage(self._transform(train=False), self.hparams.seed, rank)
        self.stages[name] = stage
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.val_shards),
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=wds.warn_and_continue, select_files=select_member),
            stage,
            wds.batched(self.val_batch_size, collation_fn=collate, partial=True),
        )
        num_shards = len(wds.SimpleShardList(self.val_shards).urls)
        return self._loader(pipeline, min(self.num_workers, num_shards))

    def val_dataloader(self) -> DataLoader:
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        hp = self.hparams
        if not hp.predict_images:
            raise ValueError("data.predict_images is empty: give a folder of condition images")
        dataset = ConditionFolder(
            hp.predict_images, hp.predict_prompt, hp.predict_upscale, hp.predict_multiple
        )
        return DataLoader(
            dataset, batch_size=hp.predict_batch_size, shuffle=False,
            num_workers=min(self.num_workers, 4), collate_fn=collate_conditions,
        )  # fmt: skip
