"""A ModelCheckpoint that CLI runs in tests load by class_path (PYTHONPATH=tests/helpers)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint


class KillBeforeLastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose process kills itself (SIGKILL) at step ``kill_at_step`` after
    writing the step checkpoint and before writing ``last.ckpt``: what a node failure
    between Lightning's two writes leaves. ``record_start``: a file that gets the global
    step the run starts from."""

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: int,
        save_last: bool = True,
        save_top_k: int = -1,
        kill_at_step: int | None = None,
        record_start: str | None = None,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=every_n_train_steps,
            save_last=save_last,
            save_top_k=save_top_k,
            enable_version_counter=False,
        )
        self.kill_at_step = kill_at_step
        self.record_start = record_start

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if self.record_start:
            Path(self.record_start).write_text(str(trainer.global_step))

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        if trainer.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        super()._save_last_checkpoint(trainer, monitor_candidates)
