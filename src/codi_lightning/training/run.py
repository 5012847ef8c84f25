"""Per-run helpers shared by the LightningModules: the run folder and seeded generators."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import torch

from ..compat import logger_connector


def run_dir(trainer: L.Trainer) -> Path:
    """Where a run writes its grids and results: the logger's folder, else
    ``default_root_dir``. ``Trainer.log_dir`` is a COLLECTIVE (it broadcasts the path):
    call this on every rank (e.g. in ``setup``) and keep the result, never from code that
    only rank 0 runs."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def seeded_generator(key: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by the SHA-256 of ``key`` (e.g. ``"seed:step:salt"``)."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & (2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


def logs_this_step(trainer: L.Trainer | None) -> bool:
    """Whether this training step's scalars go to ``self.log``: on the steps the loggers
    write (every ``log_every_n_steps``) and on the last step of the run (``max_steps``).

    Each ``self.log`` call costs ~2 ms of Lightning's bookkeeping on the CPU (it moves the
    stored result to the value's device), so five of them a step were ~10% of a tiny CPU
    step (bench/step_overhead.py, docs/performance.md), and on a GPU every logged value
    shown in the progress bar is a device sync. What the loggers write is unchanged; the
    progress bar and ``trainer.callback_metrics`` hold the values of the last logged step
    (a callback monitoring a ``train/`` metric sees it refreshed every
    ``log_every_n_steps``: set that to 1 to monitor every step). Without a trainer (or on
    a Lightning without the connector's ``should_update_logs``) every step logs.
    """
    if trainer is None:
        return True
    connector = logger_connector(trainer)
    if bool(getattr(connector, "should_update_logs", True)):
        return True
    max_steps = getattr(trainer, "max_steps", -1) or -1
    return 0 < max_steps <= trainer.global_step + 1  # the run's last step


def check_float_pixels(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` itself, or a clear error for uint8 pixels: ``ShardDataModule``'s loaders ship
    uint8 and convert them on the device only when the Trainer is given the data module."""
    if x.dtype == torch.uint8:
        raise TypeError(
            f"batch[{name!r}] holds uint8 pixels: ShardDataModule's loaders ship uint8 and "
            "convert them to floats after the transfer when the Trainer runs with the data "
            "module (trainer.fit(model, datamodule=dm)); when you feed its loaders "
            "yourself, apply codi_lightning.data.float_pixels to each batch"
        )
    return x
