"""Read full and sharded (distributed-checkpoint) Lightning checkpoints alike."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch


def is_sharded(path: str | Path) -> bool:
    """A folder written by ``ModelParallelStrategy(save_distributed_checkpoint=True)``."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint as one dict on the CPU: ``state_dict``, ``optimizer_states``,
    ``hyper_parameters``, ``global_step``... A sharded folder is gathered in memory
    (the whole model must fit in CPU memory)."""
    path = Path(path)
    if is_sharded(path):
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        checkpoint = _load_distributed_checkpoint(path)
        optimizer_keys = sorted(
            (k for k in checkpoint if re.fullmatch(r"optimizer_\d+", k)),
            key=lambda k: int(k.split("_")[1]),
        )
        if optimizer_keys:
            checkpoint["optimizer_states"] = [checkpoint.pop(k) for k in optimizer_keys]
        return checkpoint
    if path.is_dir():
        raise FileNotFoundError(
            f"{path} is a folder but not a distributed checkpoint (no .metadata)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r}: no such checkpoint file or folder")
    return torch.load(path, map_location="cpu", weights_only=True)


def consolidate_checkpoint(ckpt: str, output: str) -> Path:
    """Gather a sharded checkpoint folder into one file.

    Args:
        ckpt: distributed-checkpoint folder (``ModelParallelStrategy``).
        output: file to write.

    The weights load anywhere (``load_from_checkpoint``, ``export``); the optimizer state
    stays keyed by parameter name, as ``ModelParallelStrategy`` resumes it.
    """
    if not is_sharded(ckpt):
        raise ValueError(f"--ckpt {ckpt!r} is not a distributed-checkpoint folder")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(read_checkpoint(ckpt), out)
    return out
