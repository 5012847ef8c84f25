"""A callback that CLI runs in tests load by class_path (PYTHONPATH=tests/helpers)."""

from __future__ import annotations

import lightning as L


class PoisonBatch(L.Callback):
    """Put one NaN into the image of the batch that rank ``rank`` trains on at step
    ``step``: a non-finite loss on one process only, which every process must skip alike."""

    def __init__(self, rank: int = 1, step: int = 1) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            batch["image"][0, 0, 0, 0] = float("nan")
