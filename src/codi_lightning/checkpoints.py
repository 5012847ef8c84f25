"""Read full and sharded (distributed-checkpoint) Lightning checkpoints alike; check them
up front, find the newest one of a run, and resolve the teacher paths they record."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

LIGHTNING_META = "meta.pt"  # Lightning's file of non-tensor state in a sharded folder
CHECKSUMS = "checksums.json"  # CRC-32 and size of every file of a sharded folder
# Where CoDiDistillation's trained weights sit in its state dict, online and EMA target:
# its ``controlnet``, the full-CoDi copy of the network ``student_network`` and the LoRA's
# ``lora.weights``, and their ``target`` copies (tests/training/test_module.py checks
# them against the module). Export reads checkpoints through this table alone.
STATE_PREFIXES = {
    "adapter": {"online": "controlnet.", "target": "target.controlnet."},
    "network": {"online": "student_network.", "target": "target.network."},
    "lora": {"online": "lora.weights.", "target": "target.lora."},
}
# Prefixes of checkpoints written before the networks were named for what they hold
# (a UNet or a transformer): CoDiDistillation's full-CoDi copy and its EMA target,
# DiffusionTraining's network and EMA network. Loading and reading rename them.
LEGACY_PREFIXES = {
    "student_unet.": "student_network.",
    "target.unet.": "target.network.",
    "ema_unet.": "ema_network.",
    "unet.": "network.",
}


def legacy_keys(keys: Iterable[str]) -> list[str]:
    """The keys among ``keys`` that start with a :data:`LEGACY_PREFIXES` prefix."""
    return [k for k in keys if k.startswith(tuple(LEGACY_PREFIXES))]


def renamed_legacy_keys(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with its :data:`LEGACY_PREFIXES` keys under their current names (the
    same dict when there are none; order kept)."""
    if not legacy_keys(state):
        return state
    out = {}
    for key, value in state.items():
        old = next((p for p in LEGACY_PREFIXES if key.startswith(p)), None)
        out[key if old is None else LEGACY_PREFIXES[old] + key[len(old) :]] = value
    return out


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


def check_checkpoint(path: str | Path, verify_data: bool = True) -> Path:
    """Up-front check that ``path`` is a checkpoint this project can read safely, before
    anything loads it. Raises :class:`CheckpointError`, one line naming the path and what
    the file is.

    A file must be a complete zip archive (what ``torch.save`` writes), whose records all
    match their CRC-32 (``verify_data``: reads the whole file, 0.3 s per GB from the page
    cache, docs/performance.md; a damaged byte is named here instead of trained on), whose
    pickle holds only tensors and plain data (unpickled with ``weights_only=True``, tensors
    memory-mapped, not read) and which holds a ``state_dict``. A folder must be a
    distributed checkpoint that :func:`verify_sharded` reads without running anything,
    whose files match the CRC-32s recorded at save (:func:`verify_checksums`, where
    the folder has them)."""
    path = Path(path)
    if path.is_dir():
        if not (path / ".metadata").is_file():
            raise CheckpointError(
                f"{path}: a folder but not a distributed checkpoint (no .metadata)"
            )
        if verify_data:
            verify_checksums(path)
        verify_sharded(path)
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
    if verify_data:
        _verify_crc(path)
    _probe(path)
    return path


def _global_named(err: BaseException) -> str | None:
    """The module global an unpickler refused (``GLOBAL os.system`` in torch's and our
    messages), or None."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return found.group(1) if found else None


def _verify_crc(path: Path) -> None:
    """Every record of the zip archive against its CRC-32 (``torch.save`` records them;
    ``torch.load`` does not check them)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointError(f"{path}: unreadable zip archive ({err})") from None
    if bad is not None:
        raise CheckpointError(
            f"{path}: damaged: the record {bad!r} does not match its CRC-32 (a flipped or "
            "lost byte); use another checkpoint"
        )


def _crc32(path: Path, chunk: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def write_checksums(folder: str | Path) -> Path:
    """Record the size and CRC-32 of every file of a sharded checkpoint folder in its
    ``checksums.json`` (written under a temporary name, then renamed), so that a damaged
    or half-rewritten file is named at load (:func:`verify_checksums`) instead of
    trained on. Distributed checkpoints carry no checksum of their own."""
    folder = Path(folder)
    record = {p.name: {"size": p.stat().st_size, "crc32": _crc32(p)}
              for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS}  # fmt: skip
    partial = folder / f".{CHECKSUMS}.partial"
    partial.write_text(json.dumps(record, indent=1))
    os.replace(partial, folder / CHECKSUMS)
    return folder / CHECKSUMS


MAX_CHECKSUMS_BYTES = 10_000_000  # a record per file: a few MB even for 10,000 ranks


def verify_checksums(folder: str | Path) -> None:
    """Each file recorded in the folder's ``checksums.json`` present, of its recorded size
    and CRC-32 (reads every byte: 0.3 s per GB from the page cache); a folder without
    the record (written by Lightning's own ``ModelParallelStrategy``) is not checked.
    Raises :class:`CheckpointError` naming the file."""
    folder = Path(folder)
    record_file = folder / CHECKSUMS
    if not record_file.is_file():
        return
    try:
        if record_file.stat().st_size > MAX_CHECKSUMS_BYTES:
            raise ValueError("too large")
        record = json.loads(record_file.read_text())
        items = [(str(name), int(v["size"]), int(v["crc32"])) for name, v in record.items()]
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as err:
        raise CheckpointError(f"{record_file}: unreadable checksum record ({err})") from None
    for name, size, crc in items:
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise CheckpointError(f"{folder}: incomplete: {name!r} recorded at save is missing")
        if path.stat().st_size != size or _crc32(path) != crc:
            raise CheckpointError(
                f"{path}: damaged: its size or CRC-32 differs from the one recorded at save "
                "(a flipped or lost byte, or a save cut short); use another checkpoint"
            )


def _probe(path: Path) -> None:
    """Unpickle with ``weights_only=True``, tensors memory-mapped (not read), and check
    that it is a Lightning checkpoint; the errors name what the file is."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:
        what = f"({_global_named(err)})" if _global_named(err) else ""
        raise CheckpointError(
            f"{path}: refused: it holds pickled objects other than tensors and plain data "
            f"{what}; a codi-lightning checkpoint holds none (a file from another tool, or "
            "altered): do not load it"
        ) from None
    except Exception as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{path}: a torch file but not a Lightning checkpoint (no state_dict): give a "
            "checkpoint that codi-lightning fit wrote"
        )


# what the ``.metadata`` pickle of torch's distributed checkpoints names (torch 2.6-2.14):
# its metadata classes, torch.Size, dtypes (checked by type), layouts, the checkpoint path
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
SAFE_METADATA_GLOBALS = {
    (_DCP_METADATA, n)
    for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
              "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a distributed checkpoint's ``.metadata`` naming only
    :data:`SAFE_METADATA_GLOBALS` and torch dtypes (Python's "restricting globals"); any
    other name (``os.system``, ``builtins.eval``...) raises ``UnpicklingError``."""

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in SAFE_METADATA_GLOBALS or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed")


def _safe_reader(path: Path):
    """A ``FileSystemReader`` whose ``.metadata`` goes through :class:`_MetadataUnpickler`
    (torch's own ``read_metadata`` unpickles it with no restriction). Tensor records are
    read by torch with ``weights_only=True`` already."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            with open(Path(self.path) / ".metadata", "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def _safe_bytes(planner_class: type) -> type:
    """``planner_class`` whose non-tensor items are unpickled with ``weights_only=True``
    (torch's planners use ``weights_only=False``); the checked object is handed on
    re-serialised, so the parent's loader sees nothing else."""

    class SafeBytes(planner_class):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as err:
                name = _global_named(err) or "an object that is not plain data"
                raise pickle.UnpicklingError(f"GLOBAL {name} is not allowed") from None
            clean = io.BytesIO()
            torch.save(obj, clean)
            clean.seek(0)
            super().load_bytes(read_item, clean)

    return SafeBytes


def state_keys(path: str | Path) -> list[str]:
    """The model state's key names of a checkpoint file or sharded folder, no tensor read
    (a file is memory-mapped; a folder's ``.metadata`` read by the safe reader)."""
    path = Path(path)
    if is_sharded(path):
        metadata = _safe_reader(path).read_metadata()
        tag = "state_dict."
        return [k[len(tag) :] for k in metadata.state_dict_metadata if k.startswith(tag)]
    return list(checkpoint_metadata(path).get("state_dict", {}))


def check_current_keys(path: str | Path) -> None:
    """Raise :class:`CheckpointError` for a checkpoint whose weights carry the names of
    :data:`LEGACY_PREFIXES`, where they cannot be renamed on the way in (FSDP2 loads a
    checkpoint by the module's own key names)."""
    old = legacy_keys(state_keys(path))
    if old:
        raise CheckpointError(
            f"{path}: written before the networks' renaming (keys such as {old[0]!r}): "
            "FSDP2 cannot resume it; resume it with DDP or one process, or export it "
            "(codi-lightning export reads it)"
        )


def verify_sharded(path: str | Path) -> None:
    """A distributed-checkpoint folder read without running anything a stranger could
    have written: its ``.metadata`` through an allowlist of torch's metadata classes, each
    non-tensor item with ``weights_only=True`` (tensors are not read), the files the
    metadata names present, a ``state_dict`` in it, and Lightning's ``meta.pt`` with
    ``weights_only=True``. Raises :class:`CheckpointError` naming what was refused."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    path = Path(path)
    try:
        reader = _safe_reader(path)
        metadata = reader.read_metadata()
        files = {getattr(info, "relative_path", None) for info in metadata.storage_data.values()}
        missing = sorted(f for f in files if f and not (path / f).is_file())
        if missing:
            raise CheckpointError(f"{path}: incomplete distributed checkpoint (no {missing[0]})")
        keys = metadata.state_dict_metadata
        if not any(k.startswith("state_dict.") for k in keys):
            raise CheckpointError(f"{path}: a distributed checkpoint without a state_dict")
        items = {k: None for k, m in keys.items() if isinstance(m, BytesStorageMetadata)}
        if items:
            planner = _safe_bytes(DefaultLoadPlanner)(flatten_state_dict=False)
            load(items, storage_reader=_safe_reader(path), planner=planner, no_dist=True)
        meta = path / LIGHTNING_META
        if meta.is_file():
            torch.load(meta, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as err:  # torch's is a BaseException
        name = _global_named(err)
        if name:
            raise CheckpointError(
                f"{path}: refused: the distributed checkpoint names {name}, which a "
                "checkpoint of torch's holds only to run code; do not load it"
            ) from None
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path}: unreadable distributed checkpoint ({reason})") from None


def _load_sharded(path: Path) -> dict[str, Any]:
    """Lightning's ``_load_distributed_checkpoint`` through the safe reader and planner of
    :func:`verify_sharded` (nothing in the folder is unpickled beyond torch's metadata
    classes, tensors and plain data), ``weights_only=True`` for its ``meta.pt``."""
    from torch.distributed.checkpoint.api import CheckpointException

    from .compat import load_dcp_state

    checkpoint: dict[str, Any] = {}
    try:
        load_dcp_state(checkpoint, _safe_reader(path), _safe_bytes)
    except (pickle.UnpicklingError, CheckpointException) as err:
        if _global_named(err) is None:
            raise
        raise CheckpointError(f"{path}: refused: it names {_global_named(err)}") from None
    meta = path / LIGHTNING_META
    if meta.is_file():
        checkpoint.update(torch.load(meta, map_location="cpu", weights_only=True))
    return checkpoint


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint as one dict on the CPU: ``state_dict`` (older key names renamed,
    :data:`LEGACY_PREFIXES`), ``optimizer_states``, ``hyper_parameters``,
    ``global_step``... A sharded folder is gathered in memory (the whole model must fit
    in CPU memory). ``mmap``: a file's tensors are memory-mapped, read when used (export
    of a real-size checkpoint: SDXL's PE-CoDi checkpoint is 11.6 GB)."""
    path = check_checkpoint(path)
    if is_sharded(path):
        checkpoint = _load_sharded(path)
        optimizer_keys = sorted(
            (k for k in checkpoint if re.fullmatch(r"optimizer_\d+", k)),
            key=lambda k: int(k.split("_")[1]),
        )
        if optimizer_keys:
            checkpoint["optimizer_states"] = [checkpoint.pop(k) for k in optimizer_keys]
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    if isinstance(checkpoint.get("state_dict"), dict):
        checkpoint["state_dict"] = renamed_legacy_keys(checkpoint["state_dict"])
    return checkpoint


def checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """A checkpoint file's dict memory-mapped (the weights are not read until used), or a
    sharded folder's metadata file (``global_step``, ``hyper_parameters``,
    ``datamodule_hyper_parameters``...). Raises :class:`CheckpointError` on a checkpoint
    that is incomplete or unreadable."""
    file = check_checkpoint(path, verify_data=False)
    if file.is_dir():
        file = file / LIGHTNING_META
        if not file.is_file():
            raise CheckpointError(
                f"{path}: incomplete distributed checkpoint (no {LIGHTNING_META})"
            )
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # any failure to read means: not a usable checkpoint
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"{file}: unreadable ({type(err).__name__}: {reason})") from err


def checkpoint_step(path: str | Path) -> int:
    """The ``global_step`` recorded in a checkpoint file or sharded folder, read without
    loading the weights (:func:`checkpoint_metadata`)."""
    meta = checkpoint_metadata(path)
    try:
        return int(meta["global_step"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable (no global_step: {err!r})") from err


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
    skipped as incomplete, unreadable, damaged or refused (:func:`check_checkpoint`), in
    which case the next one down is taken."""
    candidates: dict[Path, Path] = {}
    for roots, recursive in ((folders, False), (search, True)):
        for root in roots:
            for path in checkpoint_candidates(root, recursive):
                candidates.setdefault(path.resolve(), path)
    ranked: list[tuple[int, float, Path]] = []
    skipped: list[str] = []
    for path in candidates.values():
        try:
            step = checkpoint_step(path)  # read safely (check_checkpoint without the CRCs)
        except CheckpointError as err:
            skipped.append(str(err))
            continue
        stamp = (path / LIGHTNING_META if path.is_dir() else path).stat().st_mtime
        ranked.append((step, stamp, path))
    for step, _, path in sorted(ranked, key=lambda r: r[:2], reverse=True):
        try:  # the whole file against its CRCs, only for the one about to be used
            check_checkpoint(path)
        except CheckpointError as err:
            skipped.append(str(err))
            continue
        return (path, step), skipped
    return None, skipped


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
