"""Per-run helpers shared by the LightningModules: the run folder and seeded generators."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import torch


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
