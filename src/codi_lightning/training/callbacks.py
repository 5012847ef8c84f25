"""Callbacks."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from torchvision.utils import save_image

from ..data.folder import SKIP_REASONS


class ImageWriter(BasePredictionWriter):
    """Write each predicted image as ``<output_dir>/<name>.png`` (``name``: the input's
    relative path without its extension, see ``data.folder.output_names``), each file
    written under a temporary name and renamed when complete, so an interrupted run
    leaves no truncated image.

    Inputs that could not be used arrive in ``prediction["skipped"]`` (``[{"name",
    "reason", "detail"}, ...]``, see ``collate_conditions``): each is printed with its
    full name when its batch ends, on the rank that met it. At the end, the written and
    skipped counts (per reason) are summed over all ranks and rank 0 prints one line.
    """

    def __init__(self, output_dir: str) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.written = 0
        self.skipped: list[dict[str, str]] = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Per run: reset the counts; rank 0 removes the partial files an interrupted run
        left (and says so) while the others wait (a collective: every rank calls it)."""
        self.written, self.skipped = 0, []
        if trainer.is_global_zero and self.output_dir.is_dir():
            partial = list(self.output_dir.rglob(".*.png.partial"))
            for path in partial:
                path.unlink()
            if partial:
                print(f"removed {len(partial)} partial images of an interrupted run in "
                      f"{self.output_dir}", flush=True)  # fmt: skip
        trainer.strategy.barrier("image_writer_start")

    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: dict[str, Any],
        batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        for entry in _skipped_entries(prediction):
            print(f"skipped {entry['name']}: {entry['detail']}", flush=True)
            self.skipped.append(entry)
        names = prediction.get("names") or []
        images = prediction.get("images")
        if images is None or len(images) == 0:
            if names:
                raise ValueError(
                    f"predict_step returned {len(names)} names but no images: return one "
                    "image per name"
                )
            return
        for image, name in zip(images, names, strict=True):
            path = self.output_dir / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.partial")
            save_image(image, partial, format="png")
            os.replace(partial, path)
            self.written += 1

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a collective: every rank calls it (on one rank only it would wait forever)
        reasons = list(SKIP_REASONS)
        other = sum(1 for e in self.skipped if e["reason"] not in reasons)
        counts = [self.written, *(sum(e["reason"] == r for e in self.skipped) for r in reasons)]
        counts = torch.tensor([*counts, other], dtype=torch.long, device=_device(trainer))
        total = [int(v) for v in trainer.strategy.reduce(counts, reduce_op="sum")]
        if not trainer.is_global_zero:
            return
        written, per_reason = total[0], dict(zip([*reasons, "other"], total[1:], strict=True))
        line = f"wrote {written} images to {self.output_dir}"
        skipped = sum(per_reason.values())
        if skipped:
            parts = ", ".join(f"{n} {r}" for r, n in per_reason.items() if n)
            line += f"; skipped {skipped} inputs ({parts}), named above"
        print(line, flush=True)


class StepProgressBar(TQDMProgressBar):
    """The training bar counts optimizer steps of ``trainer.max_steps`` (runs are step-based
    over streamed shards, so epochs say nothing) and leaves out the logger's ``v_num``.
    With ``max_steps`` unset it is Lightning's epoch bar. The CLI's default bar."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_epoch_start(trainer, *args)
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.n = bar.last_print_n = trainer.global_step  # a resumed run starts where it was
        bar.set_description("Step")
        return None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total):
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            # tqdm redraws at most every ``mininterval`` (0.1 s): a redraw every step was
            # ~1% of a tiny CPU step (bench/step_overhead.py)
            bar.update(trainer.global_step - bar.n)
        return None

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def _skipped_entries(prediction: dict[str, Any]) -> list[dict[str, str]]:
    """``prediction["skipped"]`` as ``[{"name", "reason"}]`` (none when absent)."""
    entries = prediction.get("skipped") or []
    if not isinstance(entries, Sequence) or isinstance(entries, str):
        return []  # e.g. a training-style {reason: count} dict: no file names to report
    return [
        {"name": str(e.get("name", "?")), "reason": str(e.get("reason", "unreadable")),
         "detail": str(e.get("detail") or e.get("reason", "unreadable"))}
        for e in entries
        if isinstance(e, dict)
    ]  # fmt: skip


def _device(trainer: L.Trainer) -> torch.device:
    """Where the strategy's collectives run (CUDA for NCCL)."""
    return getattr(trainer.strategy, "root_device", None) or torch.device("cpu")
