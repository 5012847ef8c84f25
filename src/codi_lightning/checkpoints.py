"""Read full and sharded (distributed-checkpoint) Lightning checkpoints alike; check them
up front, find the newest one of a run, and resolve the teacher paths they record."""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

LIGHTNING_META = "meta.pt"  # Lightning's file of non-tensor state in a sharded folder


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (or a teacher it records that cannot be found); the
    message is one line naming the file and what is wrong."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist."""


class TeacherNotFoundError(CheckpointError):
    """A local teacher path (recorded in a checkpoint or given) does not exist here."""


def is_sharded(path: str | Path) -> bool:
    """A folder written by ``ModelParallelStrategy(save_distributed_checkpoint=True)``."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def check_checkpoint(path: str | Path) -> Path:
    """Cheap up-front check (no unpickling) that ``path`` can be a checkpoint: a non-empty
    zip archive (what ``torch.save`` writes; a write cut short has no end-of-archive
    record) or a distributed-checkpoint folder. Raises :class:`CheckpointError`."""
    path = Path(path)
    if path.is_dir():
        if not (path / ".metadata").is_file():
            raise CheckpointError(
                f"{path}: a folder but not a distributed checkpoint (no .metadata)"
            )
        return path
    if not path.exists():
        raise CheckpointNotFoundError(f"{str(path)!r}: no such checkpoint file or folder")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            zip_start = f.read(4) == b"PK\x03\x04"
        if zip_start:
            raise CheckpointError(
                f"{path}: truncated checkpoint ({size} bytes, the zip archive has no end record)"
            )
        raise CheckpointError(
            f"{path}: not a checkpoint ({size} bytes, not the zip archive torch.save writes)"
        )
    return path


def _load_sharded(path: Path) -> dict[str, Any]:
    """Lightning's ``_load_distributed_checkpoint``, with ``weights_only=True`` for its
    ``meta.pt``. torch's distributed-checkpoint reader itself unpickles ``.metadata``
    (and non-tensor items): read sharded folders only from sources you trust."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    checkpoint: dict[str, Any] = {}
    _load_state_dict(
        checkpoint,
        storage_reader=FileSystemReader(path),
        planner=_EmptyStateDictLoadPlanner(),
        no_dist=True,
    )
    meta = path / LIGHTNING_META
    if meta.is_file():
        checkpoint.update(torch.load(meta, map_location="cpu", weights_only=True))
    return checkpoint


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint as one dict on the CPU: ``state_dict``, ``optimizer_states``,
    ``hyper_parameters``, ``global_step``... A sharded folder is gathered in memory
    (the whole model must fit in CPU memory)."""
    path = check_checkpoint(path)
    if is_sharded(path):
        checkpoint = _load_sharded(path)
        optimizer_keys = sorted(
            (k for k in checkpoint if re.fullmatch(r"optimizer_\d+", k)),
            key=lambda k: int(k.split("_")[1]),
        )
        if optimizer_keys:
            checkpoint["optimizer_states"] = [checkpoint.pop(k) for k in optimizer_keys]
        return checkpoint
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_step(path: str | Path) -> int:
    """The ``global_step`` recorded in a checkpoint file or sharded folder, read without
    loading the weights (memory-mapped). Raises :class:`CheckpointError` on a checkpoint
    that is incomplete or unreadable."""
    file = check_checkpoint(path)
    if file.is_dir():
        file = file / LIGHTNING_META
        if not file.is_file():
            raise CheckpointError(
                f"{path}: incomplete distributed checkpoint (no {LIGHTNING_META})"
            )
        check_checkpoint(file)
    try:
        meta = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        return int(meta["global_step"])
    except Exception as err:  # any failure to read means: not a usable checkpoint
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"{file}: unreadable ({type(err).__name__}: {reason})") from err


def checkpoint_candidates(folder: str | Path, recursive: bool = False) -> list[Path]:
    """``*.ckpt`` files and sharded folders in ``folder`` (and below it if ``recursive``);
    folders named ``*.ckpt`` without ``.metadata`` are included (as broken), so the caller
    can say it skipped them."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        here = Path(root)
        found += [here / f for f in files if f.endswith(".ckpt")]
        for d in list(dirs):
            if (here / d / ".metadata").is_file() or d.endswith(".ckpt"):
                found.append(here / d)
                dirs.remove(d)  # a checkpoint's own files are not candidates
        if not recursive:
            break
    return sorted(found)


def newest_checkpoint(
    folders: Iterable[str | Path] = (), search: Iterable[str | Path] = ()
) -> tuple[tuple[Path, int] | None, list[str]]:
    """The complete checkpoint with the highest ``global_step`` (ties: the newest file) in
    ``folders`` and anywhere below ``search``, with its step; and one line per candidate
    skipped as incomplete or unreadable."""
    candidates: dict[Path, Path] = {}
    for roots, recursive in ((folders, False), (search, True)):
        for root in roots:
            for path in checkpoint_candidates(root, recursive):
                candidates.setdefault(path.resolve(), path)
    best: tuple[int, float, Path] | None = None
    skipped: list[str] = []
    for path in candidates.values():
        try:
            step = checkpoint_step(path)
        except CheckpointError as err:
            skipped.append(str(err))
            continue
        stamp = (path / LIGHTNING_META if path.is_dir() else path).stat().st_mtime
        if best is None or (step, stamp) > best[:2]:
            best = (step, stamp, path)
    return ((best[2], best[0]) if best else None), skipped


# --------------------------------------------------------------- recorded teacher paths
def _is_hub_id(value: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def resolve_local_path(value: str | None, always_local: bool = False) -> str | None:
    """An existing local path made absolute, so that a checkpoint recording it loads from
    any working directory; anything else (a hub id) stays as typed. ``always_local``: the
    value is a local path even before it exists (an output folder)."""
    if not value:
        return value
    path = Path(value).expanduser()
    # abspath, not resolve: a symlink the user named stays the recorded name
    return os.path.abspath(path) if always_local or path.exists() else value


def is_missing_local_path(value: str | None) -> bool:
    """``value`` names a local path that does not exist here (not a hub id)."""
    return bool(value) and not Path(value).expanduser().exists() and not _is_hub_id(value)


def check_teacher(value: str | None, override: str) -> None:
    """Raise :class:`TeacherNotFoundError` naming ``override`` when ``value`` is a local
    path that does not exist here (moved, or another machine)."""
    if is_missing_local_path(value):
        raise TeacherNotFoundError(
            f"teacher {value!r} not found (moved, or another machine?); "
            f"give its location with {override}"
        )


def consolidate_checkpoint(ckpt: str, output: str) -> Path:
    """Gather a sharded checkpoint folder into one file.

    Args:
        ckpt: distributed-checkpoint folder (``ModelParallelStrategy``).
        output: file to write.

    The weights load anywhere (``load_from_checkpoint``, ``export``); the optimizer state
    stays keyed by parameter name, as ``ModelParallelStrategy`` resumes it.
    """
    check_checkpoint(ckpt)
    if not is_sharded(ckpt):
        raise CheckpointError(f"--ckpt {ckpt!r} is a file, not a distributed-checkpoint folder")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(read_checkpoint(ckpt), out)
    return out
