"""A LightningDataModule streaming WebDataset shards of (condition, image, caption).

Shard format (see docs/data.md): each sample has a target image (``jpg``/``png``/
``webp``), optionally a condition (``cond.png``/``cond.jpg``), a caption (``txt``) and
metadata (``json``). Training streams are resampled (infinite; train by
``trainer.max_steps``), optionally mixed from several weighted sources; validation
streams are read once, split across ranks and workers. Bad samples and unreadable shards
are skipped and counted per reason (``PairStage.skipped`` and ``batch["skipped"]``).
"""

from __future__ import annotations

import logging
import random
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypedDict

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .decode import (
    DEFAULT_MAX_PIXELS,
    BadSample,
    CacheSpec,
    CaptionErrors,
    decode_sample,
    select_member,
)
from .folder import ConditionFolder, SizeGroupedBatches, collate_conditions
from .lockstep import LockstepLoader, distributed_world
from .pixels import float_pixels
from .recipes import SR_RECIPES
from .transforms import CondMismatch, PairTransform, collate, make_recipe

log = logging.getLogger(__name__)


class ShardSource(TypedDict):
    """One weighted source of training shards (``data.train_shards`` list entry)."""

    shards: str | list[str]
    weight: float


ShardSpec = str | list[str] | list[ShardSource]


def shard_error_reason(err: Exception) -> str:
    """The skip reason for an exception raised while opening or reading a shard."""
    if isinstance(err, tarfile.ReadError) and "unexpected end" in str(err):
        return "truncated_shard"
    if isinstance(err, tarfile.ReadError) and "empty file" in str(err):
        return "unreadable_shard"  # a zero-byte file or a pipe: command that gave nothing
    if isinstance(err, tarfile.TarError):
        return "corrupt_shard"
    if isinstance(err, OSError):
        return "unreadable_shard"  # missing file, failed pipe: command, network error
    return "shard_error"


def _collect(errors: list[Exception], err: Exception) -> bool:
    """A WebDataset error handler that records the error and continues."""
    errors.append(err)
    return True


def _worker_seed(rank: int) -> int:
    info = get_worker_info()
    return rank * 1000 + (info.id if info is not None else 0)


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard URLs from a brace pattern, a ``::``-separated string or a list of them.

    Local paths, ``file:`` and ``pipe:`` URLs pass through (``pipe:cat a.tar``)."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    return [url for p in patterns for url in wds.shardlists.expand_urls(p)]


Sources = list[tuple[list[str], float]]


class MissingShardsError(FileNotFoundError):
    """Local shard files named by the config do not exist (the CLI prints the message
    alone, as a usage error)."""


def check_local_shards(urls: Sequence[str], name: str) -> None:
    """Raise :class:`MissingShardsError` if the shards are local files (paths or ``file:``
    URLs; not ``pipe:`` or remote URLs) and none of them exists: a typo'd path or pattern
    then fails at once with the fix, instead of after ``max_consecutive_skips``
    unreadable samples. Some missing among others are skipped and counted
    (``unreadable_shard``), as any shard that cannot be read."""
    local = [u.removeprefix("file:") for u in urls if "://" not in u and not u.startswith("pipe:")]
    if urls and len(local) == len(urls) and not any(Path(u).is_file() for u in local):
        raise MissingShardsError(
            f"{name}: none of the {len(urls)} shard files exists {_describe(local)}; check "
            "the path and the brace range, or write shards with "
            "`codi-lightning shards --images DIR --output 'OUT/train-%06d.tar'`"
        )


def shard_sources(spec: ShardSpec | None, name: str = "data.train_shards") -> Sources:
    """``[(urls, weight), ...]`` from a pattern, a list of patterns (one source) or a
    list of ``{"shards": pattern(s), "weight": w}`` dicts (weighted sources)."""
    if not spec:
        raise ValueError(f"{name} is empty: give shard paths to train on")
    if isinstance(spec, str) or all(isinstance(s, str) for s in spec):
        sources = [(expand_shards(spec), 1.0)]
    elif all(isinstance(s, dict) for s in spec):
        sources = []
        for i, s in enumerate(spec):
            if set(s) != {"shards", "weight"}:
                raise ValueError(
                    f"{name}[{i}]={s!r}: each source needs exactly the keys 'shards' and 'weight'"
                )
            if not float(s["weight"]) > 0:
                raise ValueError(f"{name}[{i}] weight={s['weight']!r} must be > 0")
            sources.append((expand_shards(s["shards"]), float(s["weight"])))
    else:
        raise ValueError(
            f"{name} mixes patterns and {{shards, weight}} sources; give one kind: a list of "
            "patterns (one source) or a list of {shards: ..., weight: ...} entries"
        )
    for urls, _ in sources:
        if not urls:
            raise ValueError(f"{name}={spec!r} expands to no shard URL")
    return sources


def _describe(urls: Sequence[str], limit: int = 4) -> str:
    """A short list of shard URLs for error messages."""
    shown = ", ".join(urls[:limit])
    return f"[{shown}{f', ... ({len(urls) - limit} more)' if len(urls) > limit else ''}]"


class WeightedMix(IterableDataset):
    """Draw each next sample from one of several (infinite) streams with probability
    proportional to its weight; seeded per seed, rank and worker."""

    def __init__(self, streams: Sequence[Any], weights: Sequence[float], seed: int, rank: int):
        super().__init__()
        self.streams, self.weights, self.seed, self.rank = list(streams), list(weights), seed, rank

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rng = random.Random(f"mix-{self.seed}-{_worker_seed(self.rank)}")
        iterators = [iter(s) for s in self.streams]
        weights = list(self.weights)
        while iterators:
            i = rng.choices(range(len(iterators)), weights)[0]
            try:
                yield next(iterators[i])
            except StopIteration:  # a finite source ran out: mix the rest
                del iterators[i], weights[i]


class PairStage:
    """Pipeline stages: read shards and decode safely, transform, skip bad samples and
    unreadable shards counting the reason in ``skipped``.

    Args:
        transform: the paired transform.
        seed: stream seed (combined with ``rank`` and the worker id).
        rank: global rank.
        decode: raw sample -> decoded sample (``decode_sample`` with the filters).
        max_consecutive_skips: raise instead of skipping forever: after this many bad
            samples in a row with no good sample yet, or this many shards in a row of
            one source that give no sample at all.
        urls: the shard URLs, for error messages.
    """

    def __init__(
        self,
        transform: PairTransform,
        seed: int,
        rank: int,
        decode: Any = decode_sample,
        max_consecutive_skips: int = 1000,
        urls: Sequence[str] = (),
    ) -> None:
        self.transform, self.seed, self.rank = transform, seed, rank
        self.decode, self.urls = decode, list(urls)
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped: Counter[str] = Counter()
        self.good = 0
        self.bad_in_a_row = 0
        self.bad_urls: list[str] = []  # the last shards that gave bad samples (for errors)

    def _stuck(self, what: str, urls: Sequence[str]) -> RuntimeError:
        return RuntimeError(
            f"{what} from shards {_describe(urls or self.urls)} (skip counts: "
            f"{dict(self.skipped)}); check the shard paths or pattern, the shard contents "
            "(docs/data.md) and the filters (data.min_size, data.max_aspect, "
            "data.max_pixels, data.condition), or raise data.max_consecutive_skips"
        )

    def skip(self, reason: str, detail: str = "", url: str | None = None) -> None:
        """Count one skip; raise when only bad samples came for too long."""
        self.skipped[reason] += 1
        self.bad_in_a_row += 1
        if url is not None and url not in self.bad_urls:
            self.bad_urls = [*self.bad_urls, url][-8:]
        total = self.skipped.total()
        if total in (1, 10, 100, 1000) or total % 10000 == 0:
            log.warning("skipped %s bad samples so far %s; last: %s: %s",
                        total, dict(self.skipped), reason, detail)  # fmt: skip
        if self.good == 0 and self.bad_in_a_row >= self.max_consecutive_skips:
            raise self._stuck(f"no valid sample in {self.bad_in_a_row} tries", self.bad_urls)

    def read_shards(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Shard URLs -> raw samples (only the members ``select_member`` allows); a shard
        that cannot be opened or read to its end counts one skip (``shard_*`` reasons)."""
        empty_run: list[str] = []  # URLs of the current run of shards without a sample
        for shard in src:
            errors: list[Exception] = []
            n = 0
            handler = partial(_collect, errors)
            for raw in wds.tarfile_samples(iter([dict(shard)]), handler, select_member):
                n += 1
                yield raw
            url = shard["url"]
            if errors:
                self.skip(shard_error_reason(errors[0]), f"{url}: {errors[0]!r}", url)
            elif n == 0:
                self.skip("empty_shard", url, url)
            empty_run = [] if n else [*empty_run, shard["url"]]
            if len(empty_run) >= self.max_consecutive_skips:
                urls = sorted(set(empty_run))
                raise self._stuck(f"{len(empty_run)} shards in a row gave no sample", urls)

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rng = random.Random(hash((self.seed, _worker_seed(self.rank))))
        for raw in src:
            try:
                out = self.transform(self.decode(raw), rng)
            except BadSample as err:  # named by shard and key: "<url> sample <key>: ..."
                where = f"{raw.get('__url__', '?')} sample {raw.get('__key__', '?')}"
                self.skip(err.reason, f"{where}: {err.detail or err.reason}", raw.get("__url__"))
                continue
            self.good += 1
            self.bad_in_a_row = 0
            yield out
        if self.good == 0 and self.skipped:
            log.warning("no valid sample in this stream; skip counts %s", dict(self.skipped))

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """``collate`` plus this worker's cumulative skip counts (``batch["skipped"]``)."""
        return collate(samples, self.skipped)

    def batches(self, batch_size: int, partial: bool) -> Batcher:
        """A stage collating each batch as soon as it is full (the skip counts it carries
        are those up to its last sample)."""
        return Batcher(self, batch_size, partial)


class Batcher:
    """Pipeline stage: samples -> collated batches of ``batch_size`` (the last, smaller
    one too when ``partial``)."""

    def __init__(self, stage: PairStage, batch_size: int, partial: bool) -> None:
        self.stage, self.batch_size, self.partial = stage, batch_size, partial

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        for sample in src:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self.stage.collate(batch)
                batch = []
        if batch and self.partial:
            yield self.stage.collate(batch)


class ShardDataModule(L.LightningDataModule):
    """WebDataset shards -> batches ``{"image": [-1, 1], "cond": [0, 1], "caption": [str],
    "key": [str], "skipped": {reason: count}, "original_size": [B, 2], "crop_top_left":
    [B, 2]}`` (plus ``mask`` for ``inpaint``; the sizes are SDXL's micro-conditions).

    The loaders ship ``image`` and ``cond`` as uint8 pixels [B, 3, H, W]; they become
    floats in those ranges after the transfer to the device (``on_after_batch_transfer``,
    ``data.float_pixels``), so the workers neither convert nor move 4-byte pixels. Code
    that iterates the loaders itself applies ``float_pixels`` to each batch.

    Args:
        train_shards: shard URLs: a brace pattern (``data/train-{000000..000099}.tar``),
            a list of patterns, a ``pipe:`` command (``pipe:cat a.tar``), or a list of
            weighted sources ``[{shards: pattern, weight: 2.0}, ...]`` mixed per sample
            with probabilities proportional to the weights.
        val_shards: shards for validation/test (read once, not resampled).
        resolution: crop size in pixels (the target's resolution).
        batch_size: per-process batch size.
        val_batch_size: per-process validation batch size (default: ``batch_size``).
        num_workers: DataLoader workers per process.
        condition: ``stored`` (read ``cond.*``) or a recipe that derives the condition
            from the target crop when none is stored: ``sr`` (bicubic), ``sr_realesrgan``
            (Real-ESRGAN-style degradation), ``inpaint`` (masked image, masked pixels
            grey, plus ``mask``), ``canny`` (edge map).
        sr_factor: downscaling factor of the super-resolution recipes (2, 4 or 8).
        inpaint_mask: the ``inpaint`` recipe's masks: ``box_or_stroke`` (random boxes or
            free-form strokes), ``half`` (one random half of the image) or
            ``three_quarters`` (all but one random quadrant): large masks over part of a
            centred object (the digits testbed's inpainting task).
        caption_dropout: probability of an empty caption in training (for guidance).
        hflip: random horizontal flips in training.
        resize_shorter: scale the shorter side to ``resolution`` before cropping.
        shuffle_buffer: samples in the shuffle buffer.
        seed: base seed; the training stream is reseeded from the global step on
            resume, so a resumed run does not replay the samples it saw.
        predict_images: folder of condition images for ``predict``.
        predict_prompt: prompt for images without a side ``<stem>.txt``.
        predict_upscale: scale factor applied to predict inputs (4 for 4x SR); the output
            is exactly this times the input's size, any height and width.
        predict_multiple: no longer used (the model pads inputs to its own multiple and
            crops the output back); kept so older configs load, with a warning.
        predict_batch_size: images per predict batch; images are batched with others
            of the same size, so a folder of mixed sizes batches what it can.
        predict_max_pixels: skip predict inputs whose output (``predict_upscale`` x the
            size) has more pixels than this (``too_large``), named with the option.
        predict_output: folder for predicted images (default:
            ``<trainer.default_root_dir>/predictions``).
        min_size: skip images whose shorter side is below this (``too_small``); sizes
            come from the ``json`` metadata when present, else from the image header.
        max_aspect: skip images whose longer/shorter side ratio is above this
            (``aspect_ratio``); None: no limit.
        max_pixels: skip images (target or condition) with more pixels than this
            (``too_large``), checked from the header before decoding.
        cond_mismatch: a stored condition whose size is neither the target's nor an
            integer factor smaller: ``resize`` it to the target or ``skip`` the sample
            (``size_mismatch``). Integer-factor conditions are always scaled up.
        caption_errors: captions that are not valid UTF-8: ``replace`` the bad bytes
            (U+FFFD) or ``skip`` the sample (``caption_not_utf8``).
        max_consecutive_skips: raise a clear error after this many bad samples in a row
            with no good one, or this many shards in a row without a sample, instead
            of waiting forever on a resampled stream.
    """

    def __init__(
        self,
        train_shards: str | list[str] | list[ShardSource] | None = None,
        val_shards: str | list[str] | None = None,
        resolution: int = 512,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        condition: Literal["stored", "sr", "sr_realesrgan", "inpaint", "canny"] = "stored",
        sr_factor: int = 4,
        inpaint_mask: Literal["box_or_stroke", "half", "three_quarters"] = "box_or_stroke",
        caption_dropout: float = 0.1,
        hflip: bool = False,
        resize_shorter: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        predict_images: str | None = None,
        predict_prompt: str = "",
        predict_upscale: int = 1,
        predict_multiple: int | None = None,
        predict_batch_size: int = 1,
        predict_max_pixels: int = DEFAULT_MAX_PIXELS,
        predict_output: str | None = None,
        min_size: int = 0,
        max_aspect: float | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        cond_mismatch: CondMismatch = "resize",
        caption_errors: CaptionErrors = "replace",
        max_consecutive_skips: int = 1000,
    ) -> None:
        super().__init__()
        self.check_counts(
            batch_size=batch_size, val_batch_size=val_batch_size, resolution=resolution,
            predict_batch_size=predict_batch_size, predict_upscale=predict_upscale,
            predict_max_pixels=predict_max_pixels, num_workers=num_workers,
            shuffle_buffer=shuffle_buffer, min_size=min_size,
        )  # fmt: skip
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"data.caption_dropout={caption_dropout} must lie in [0, 1]")
        make_recipe(condition, sr_factor, inpaint_mask)  # validates name, factor and mask
        self._check_options(condition, resolution, sr_factor, max_aspect, max_pixels,
                            max_consecutive_skips, cond_mismatch, caption_errors)  # fmt: skip
        if train_shards:
            shard_sources(train_shards)  # config errors surface now, not in a worker
        if predict_multiple is not None:
            warnings.warn(
                "data.predict_multiple is no longer used: predict keeps each image's size "
                "(times data.predict_upscale) and the model pads it to its own multiple; "
                "remove the option",
                DeprecationWarning,
                stacklevel=2,
            )
        self.save_hyperparameters()
        self.train_shards, self.val_shards = train_shards, val_shards
        self.resolution, self.batch_size = resolution, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.stages: dict[str, PairStage] = {}
        self.cache_spec: CacheSpec | None = None

    def expect_cache(self, spec: CacheSpec | None) -> None:
        """What the run's teacher makes, for cached shards (``data.decode.check_cached``):
        a cached member of another shape is a ``corrupt_cache`` skip naming shard, key
        and shapes. The module calls it in ``setup``, before any loader is built."""
        self.cache_spec = spec

    # the size and count options, and their least values
    COUNTS = {"batch_size": 1, "val_batch_size": 1, "resolution": 1, "predict_batch_size": 1,
              "predict_upscale": 1, "predict_max_pixels": 1, "num_workers": 0,
              "shuffle_buffer": 0, "min_size": 0}  # fmt: skip

    @classmethod
    def check_counts(cls, **values: Any) -> None:
        """The :attr:`COUNTS` options as given, each an integer of at least its least
        value (``val_batch_size`` None: ``batch_size``); the CLI calls it before any
        model loads. A negative batch size would otherwise kill a loader worker and hang
        the run."""
        for name, value in values.items():
            if value is None and name == "val_batch_size":
                continue
            low = cls.COUNTS[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                kind = "a positive integer" if low else "an integer >= 0"
                raise ValueError(f"data.{name}={value!r} must be {kind}")

    @staticmethod
    def _check_options(
        condition: str, resolution: int, sr_factor: int, max_aspect: float | None,
        max_pixels: int, max_consecutive_skips: int, cond_mismatch: str, caption_errors: str,
    ) -> None:  # fmt: skip
        """Validate the options ``make_recipe`` does not cover; errors name the fix."""
        if condition in SR_RECIPES and resolution % sr_factor:
            raise ValueError(
                f"data.resolution={resolution} is not a multiple of data.sr_factor={sr_factor}: "
                "pick a resolution the factor divides"
            )
        if max_aspect is not None and max_aspect < 1:
            raise ValueError(f"data.max_aspect={max_aspect} must be >= 1 (or null for no limit)")
        if max_pixels < 1 or max_consecutive_skips < 1:
            raise ValueError("data.max_pixels and data.max_consecutive_skips must be >= 1")
        if cond_mismatch not in ("resize", "skip") or caption_errors not in ("replace", "skip"):
            raise ValueError(
                f"data.cond_mismatch={cond_mismatch!r} must be 'resize' or 'skip' and "
                f"data.caption_errors={caption_errors!r} must be 'replace' or 'skip'"
            )

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
            recipe=make_recipe(hp.condition, hp.sr_factor, hp.inpaint_mask),
            caption_dropout=hp.caption_dropout if train else 0.0,
            cond_mismatch=hp.cond_mismatch,
            uint8=True,  # floats on the device: on_after_batch_transfer
        )

    def _stage(self, name: str, seed: int, rank: int, urls: list[str]) -> PairStage:
        hp = self.hparams
        # JPEGs at least twice the crop decode at reduced scale when resizing shrinks them
        decode = partial(decode_sample, max_pixels=hp.max_pixels, min_size=hp.min_size,
                         max_aspect=hp.max_aspect, caption_errors=hp.caption_errors,
                         draft=hp.resolution if hp.resize_shorter else 0,
                         cache_spec=self.cache_spec)  # fmt: skip
        stage = PairStage(self._transform(train=name == "train"), seed, rank, decode,
                          hp.max_consecutive_skips, urls)  # fmt: skip
        self.stages[name] = stage
        return stage

    def _loader(self, dataset: wds.DataPipeline, workers: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        sources = shard_sources(self.train_shards)
        for urls, _ in sources:
            check_local_shards(urls, "data.train_shards")
        rank, step = self._rank_and_step()
        seed = self.hparams.seed + step  # reseed from the global step: no replay on resume
        stage = self._stage("train", seed, rank, [u for urls, _ in sources for u in urls])
        worker_seed = partial(_worker_seed, rank)
        streams = [
            wds.DataPipeline(
                wds.ResampledShards(
                    urls, seed=seed + 1_000_003 * i, deterministic=True, worker_seed=worker_seed
                ),
                stage.read_shards,
            )
            for i, (urls, _) in enumerate(sources)
        ]
        weights = [w for _, w in sources]
        mixed = streams[0] if len(streams) == 1 else WeightedMix(streams, weights, seed, rank)
        pipeline = wds.DataPipeline(
            mixed,
            wds.detshuffle(
                self.hparams.shuffle_buffer, min(100, self.hparams.shuffle_buffer), seed=seed + rank
            ),
            stage,
            stage.batches(self.batch_size, partial=False),
        )
        return self._loader(pipeline, self.num_workers)

    def _eval_dataloader(self, name: str) -> DataLoader:
        if not self.val_shards:
            raise ValueError(f"data.val_shards is empty: give shard paths for {name}")
        urls = expand_shards(self.val_shards)
        check_local_shards(urls, "data.val_shards")
        rank, _ = self._rank_and_step()
        stage = self._stage(name, self.hparams.seed, rank, urls)
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.split_by_node,
            wds.split_by_worker,
            stage.read_shards,
            stage,
            stage.batches(self.val_batch_size, partial=True),
        )
        # worker processes only for the shards this rank gets (split_by_node deals them out
        # as urls[rank::world]): a rank left without any reads none and forks nothing
        share = len(urls[rank :: self._world()])
        loader = self._loader(pipeline, min(self.num_workers, share))
        return LockstepLoader(loader, self._eval_padding)

    def _world(self) -> int:
        trainer = self.trainer
        return trainer.world_size if trainer is not None else distributed_world()

    def _eval_padding(self) -> dict[str, Any]:
        """A padding batch for a rank whose shards gave no sample (see ``LockstepLoader``)."""
        r = self.resolution
        batch = {
            "image": torch.zeros(1, 3, r, r),
            "cond": torch.zeros(1, 3, r, r),
            "caption": [""],
            "key": [""],
            "skipped": {},
            "original_size": torch.tensor([[r, r]]),
            "crop_top_left": torch.zeros(1, 2, dtype=torch.long),
        }
        if self.hparams.condition == "inpaint":
            batch["mask"] = torch.zeros(1, 1, r, r)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 pixels -> the float ranges the modules take, on the device."""
        return float_pixels(batch) if isinstance(batch, dict) else batch

    def val_dataloader(self) -> LockstepLoader:
        """This rank's share of ``val_shards``, padded so every rank runs as many batches."""
        return self._eval_dataloader("val")

    def test_dataloader(self) -> LockstepLoader:
        """This rank's share of ``val_shards``, padded so every rank runs as many batches."""
        return self._eval_dataloader("test")

    def predict_dataloader(self) -> LockstepLoader:
        """Rank r predicts images r, r + W, r + 2W, ... of the folder (each image once),
        padded so every rank runs as many batches."""
        hp = self.hparams
        if not hp.predict_images:
            raise ValueError("data.predict_images is empty: give a folder of condition images")
        dataset = ConditionFolder(
            hp.predict_images, hp.predict_prompt, hp.predict_upscale,
            max_pixels=hp.max_pixels, max_output_pixels=hp.predict_max_pixels,
        )  # fmt: skip
        rank, world = self._rank_and_step()[0], self._world()
        if rank == 0:
            for source, name in dataset.renamed:
                print(f"{source}: another input has the same name; written as {name}.png")
        mine = list(range(rank, len(dataset), world))
        sizes = [dataset.output_size(i) if i % world == rank else None
                 for i in range(len(dataset))]  # fmt: skip
        loader = DataLoader(
            dataset, batch_sampler=SizeGroupedBatches(mine, sizes, hp.predict_batch_size),
            num_workers=min(self.num_workers, 4), collate_fn=collate_conditions,
        )  # fmt: skip
        return LockstepLoader(
            _PaddedWhenEmpty(loader, self._predict_padding), self._predict_padding
        )

    def _predict_padding(self) -> dict[str, Any]:
        r = self.resolution
        return {"cond": torch.zeros(1, 3, r, r), "caption": [""], "name": [""], "source": [""],
                "skipped": []}  # fmt: skip


class _PaddedWhenEmpty:
    """Predict batches whose every input was unreadable (``cond`` is None) become padding
    batches that keep their ``skipped`` list, so the writer still names the files."""

    def __init__(self, loader: DataLoader, make_padding: Any) -> None:
        self.loader, self.make_padding = loader, make_padding

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            if batch.get("cond") is None:
                batch = {**self.make_padding(), "skipped": batch.get("skipped", []), "pad": True}
            yield batch
