"""Write WebDataset shards: from a folder of images (``codi-lightning shards``), with an
optional condition folder or a condition recipe, and from a JSONL manifest of
instructed-editing triples (``write_edit_shards``). Both return and print a summary of
what was written and what was skipped, per reason."""

from __future__ import annotations

import io
import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from .decode import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTS,
    BadSample,
    decode_image,
    image_error,
    open_image,
)
from .recipes import ConditionRecipe, SuperResolution, make_recipe

WriterRecipe = Literal["sr", "sr_realesrgan", "inpaint", "canny"]
SHOW_SKIPPED = 10  # skipped inputs named in the summary (then "... and N more")


class Skipped(NamedTuple):
    """An input the writers left out: which (a path, a manifest line), why (the key of
    the ``skipped_<reason>`` count) and what exactly is wrong."""

    name: str
    reason: str
    detail: str = ""


def _images(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS
    )


def _image_folder(images: str) -> tuple[Path, list[Path]]:
    """The folder and its image files; errors name the option when there are none."""
    root = Path(images)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {images!r} is not a folder")
    files = _images(root)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTS)} images under {images!r}")
    return root, files


def _key(rel: Path) -> str:
    """A WebDataset key from a relative path: no dots (they start the extension)."""
    return re.sub(r"[^A-Za-z0-9_\-/]", "_", str(rel.with_suffix(""))).replace("/", "__")


def _ext(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def _check_output(output: str) -> None:
    if "%" not in output:
        raise ValueError(
            f"--output {output!r} needs a shard number field, e.g. 'out/train-%06d.tar'"
        )
    Path(output).parent.mkdir(parents=True, exist_ok=True)


PARTIAL = ".partial"  # a shard being written: ``.<name>.partial`` beside its final name


def _partial(fname: str) -> str:
    path = Path(fname)
    return str(path.with_name(f".{path.name}{PARTIAL}"))


def _publish(fname: str) -> None:
    os.replace(_partial(fname), fname)


def shard_writer(output: str, maxcount: int) -> wds.ShardWriter:
    """``wds.ShardWriter`` whose shards are written as ``.<name>.partial`` and renamed
    to their name when complete, so a killed run leaves no truncated tar under a shard's
    name (only a partial file, which :func:`clear_partial` removes on the next run)."""
    return wds.ShardWriter(output, maxcount=maxcount, verbose=0, opener=_partial, post=_publish)


def clear_partial(output: str) -> int:
    """Remove the partial shards an interrupted run left beside ``output``'s shards, and
    say so; returns how many."""
    pattern = Path(output)
    stem = pattern.name.split("%", 1)[0]
    folder = pattern.parent
    found = [p for p in folder.glob(f".{stem}*{PARTIAL}")] if folder.is_dir() else []
    for path in found:
        path.unlink()
    if found:
        print(f"removed {len(found)} partial shard(s) of an interrupted run in {folder}")
    return len(found)


def _read(path: Path, max_pixels: int) -> tuple[bytes, tuple[int, int]]:
    """The file's bytes and the image size from the header, after checking that the
    file is a valid image (PIL's ``verify``) of at most ``max_pixels``.

    Raises:
        BadSample: ``unreadable`` or ``too_large``; the detail does not name the file
            (``not a readable image (truncated image)``).
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise BadSample("unreadable", f"not readable ({err.strerror or err})") from err
    img = open_image(data, max_pixels, corrupt="unreadable")
    try:
        img.verify()
    except Exception as err:
        raise BadSample("unreadable", f"not a readable image ({image_error(err)})") from err
    return data, img.size


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _write_all(
    samples: Iterable[dict[str, Any] | Skipped], output: str, maxcount: int, total: int,
    progress: bool, desc: str,
) -> dict[str, int]:  # fmt: skip
    """Write the samples (a ``Skipped`` is an input left out), print and return the
    summary; the first shard is only opened for the first sample, so a run that skips
    every input leaves no (empty) tar behind."""
    counts: Counter[str] = Counter()
    skipped: list[Skipped] = []
    clear_partial(output)
    sink: wds.ShardWriter | None = None
    try:
        for sample in tqdm(samples, desc=desc, unit="sample", total=total, disable=not progress):
            if isinstance(sample, Skipped):
                counts[f"skipped_{sample.reason}"] += 1
                skipped.append(sample)
                continue
            if sink is None:
                sink = shard_writer(output, maxcount)
            sink.write(sample)
            counts["written"] += 1
    finally:
        if sink is not None:
            sink.close()
    summary = {"written": counts["written"], **{k: v for k, v in counts.items() if k != "written"}}
    print(f"shards: {json.dumps(summary)} -> {output}")
    if skipped:
        print(_describe_skipped(skipped))
    if not counts["written"]:
        print(
            f"no shard written to {output}: all {len(skipped)} inputs were skipped (see above); "
            "fix or replace those files and run again"
        )
    return summary


def _describe_skipped(skipped: list[Skipped], limit: int = SHOW_SKIPPED) -> str:
    """``skipped N inputs:`` and one line per input (the first ``limit``)."""
    lines = [f"skipped {len(skipped)} input{'s' if len(skipped) != 1 else ''}:"]
    for item in skipped[:limit]:
        lines.append(f"  {item.name} ({item.reason})" + (f": {item.detail}" if item.detail else ""))
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    return "\n".join(lines)


def _with_recipe(
    sample: dict[str, Any], data: bytes, recipe: ConditionRecipe, recipe_name: str, seed: int,
    max_pixels: int,
) -> None:  # fmt: skip
    """Add the recipe's condition as ``cond.png`` (and ``mask.png`` for inpainting).

    Super-resolution recipes store the low-resolution image (``factor`` times smaller);
    the data module scales it back up. The per-sample rng is seeded from ``seed`` and the
    key, so the result does not depend on the order of the files.
    """
    image = decode_image(data, max_pixels)
    rng = random.Random(f"{seed}:{sample['__key__']}")
    made = recipe.low(image, rng) if isinstance(recipe, SuperResolution) else recipe(image, rng)
    cond, mask = made if isinstance(made, tuple) else (made, None)
    sample["cond.png"] = _png(cond)
    if mask is not None:
        sample["mask.png"] = _png(mask)
    meta = json.loads(sample["json"])
    meta["cond"] = {"recipe": recipe_name, "seed": seed, "width": cond.width, "height": cond.height}
    if isinstance(recipe, SuperResolution):
        meta["cond"]["sr_factor"] = recipe.factor
    sample["json"] = json.dumps(meta).encode()


def _folder_samples(
    root: Path, files: list[Path], cond_root: Path | None, recipe: str | None, sr_factor: int,
    seed: int, max_pixels: int,
) -> Iterator[dict[str, Any] | Skipped]:  # fmt: skip
    """One sample dict (or a ``Skipped``) per target image of the folder."""
    recipe_fn = make_recipe(recipe, sr_factor) if recipe is not None else None
    for path in files:
        rel = path.relative_to(root)
        try:
            data, (width, height) = _read(path, max_pixels)
        except BadSample as err:
            yield Skipped(str(rel), err.reason, err.detail)
            continue
        sample: dict[str, Any] = {
            "__key__": _key(rel),
            _ext(path): data,
            "json": json.dumps({"width": width, "height": height, "source": str(rel)}).encode(),
        }
        caption = path.with_suffix(".txt")
        if caption.is_file():
            sample["txt"] = caption.read_text(encoding="utf-8", errors="replace").strip()
        if cond_root is not None:
            found = sorted(c for c in (cond_root / rel).parent.glob(path.stem + ".*")
                           if c.suffix.lower().lstrip(".") in IMAGE_EXTS)  # fmt: skip
            if not found:
                where = (cond_root / rel).parent / f"{path.stem}.*"
                yield Skipped(str(rel), "no_condition", f"no condition image {where}")
                continue
            sample[f"cond.{_ext(found[0])}"] = found[0].read_bytes()
        elif recipe_fn is not None:
            try:
                _with_recipe(sample, data, recipe_fn, recipe, seed, max_pixels)
            except Exception as err:  # pixel data that verify() let through but cannot decode
                yield Skipped(str(rel), "unreadable", f"not a readable image ({image_error(err)})")
                continue
        yield sample


def write_shards(
    images: str,
    output: str,
    conditions: str | None = None,
    maxcount: int = 1000,
    progress: bool = True,
    recipe: WriterRecipe | None = None,
    sr_factor: int = 4,
    seed: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, int]:
    """Write shards of (image, optional condition, optional caption) from a folder.

    Args:
        images: folder of target images (searched recursively; jpg, png, webp).
        output: shard pattern with a printf field, e.g. ``shards/train-%06d.tar``.
        conditions: optional parallel folder holding a condition image with the same
            relative path and stem as each target (any image extension).
        maxcount: samples per shard.
        progress: show a progress bar.
        recipe: compute the condition with a recipe and store it as ``cond.png``:
            ``sr``/``sr_realesrgan`` store the low-resolution input (``sr_factor`` times
            smaller), ``inpaint`` the masked image (and the mask as ``mask.png``),
            ``canny`` the edge map. Not together with ``conditions``.
        sr_factor: downscaling factor of the super-resolution recipes (2, 4 or 8).
        seed: seed of the recipes' randomness (per sample: seed and key).
        max_pixels: skip images with more pixels than this (``skipped_too_large``).

    Captions come from a side file ``<stem>.txt`` next to the image. Image bytes are
    stored as they are (no re-encoding); ``json`` holds width, height and the source path
    (and ``cond``: recipe, seed, size, factor when a recipe made the condition).

    Returns:
        Counts: ``written`` and ``skipped_<reason>`` (also printed).
    """
    _check_output(output)
    root, files = _image_folder(images)
    cond_root = Path(conditions) if conditions else None
    if cond_root is not None and not cond_root.is_dir():
        raise FileNotFoundError(f"--conditions {conditions!r} is not a folder")
    if cond_root is not None and recipe is not None:
        raise ValueError("give either --conditions (stored) or --recipe (computed), not both")
    if recipe is not None:
        make_recipe(recipe, sr_factor)  # validates the name and the factor
    samples = _folder_samples(root, files, cond_root, recipe, sr_factor, seed, max_pixels)
    return _write_all(samples, output, maxcount, len(files), progress, "writing shards")


def _manifest_entry(line: str, base: Path) -> dict[str, Any]:
    """The manifest line as a dict, with ``source_path``/``edited_path`` resolved.

    Raises:
        BadSample: ``bad_line``, ``no_instruction`` or ``missing_file``.
    """
    try:
        entry = json.loads(line)
    except ValueError as err:
        raise BadSample("bad_line", f"not JSON ({err})") from err
    if not isinstance(entry, dict) or not all(
        isinstance(entry.get(k), str) for k in ("source", "edited", "instruction")
    ):
        raise BadSample("bad_line", "needs string fields source, edited, instruction")
    if not entry["instruction"].strip():
        raise BadSample("no_instruction", "the instruction is empty")
    entry["source_path"], entry["edited_path"] = base / entry["source"], base / entry["edited"]
    if not (entry["source_path"].is_file() and entry["edited_path"].is_file()):
        missing = [entry[k] for k in ("source", "edited") if not entry[f"{k}_path"].is_file()]
        raise BadSample("missing_file", f"no such file: {', '.join(missing)}")
    return entry


def _edit_samples(
    lines: list[str], base: Path, max_pixels: int
) -> Iterator[dict[str, Any] | Skipped]:
    """One sample dict (or a ``Skipped``) per non-empty manifest line."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = _manifest_entry(line, base)
            source, edited = entry["source_path"], entry["edited_path"]
            current = entry["edited"]
            edited_data, (width, height) = _read(edited, max_pixels)
            current = entry["source"]
            source_data, (cond_width, cond_height) = _read(source, max_pixels)
        except BadSample as err:
            detail = err.detail
            if err.reason in ("unreadable", "too_large"):
                detail = f"{current} is {detail}"
            yield Skipped(f"line {number}", err.reason, detail)
            continue
        meta = {"width": width, "height": height, "cond_width": cond_width,
                "cond_height": cond_height, "source": entry["source"],
                "edited": entry["edited"], "line": number}  # fmt: skip
        yield {
            "__key__": f"{number:08d}_{_key(Path(edited.name))}",
            _ext(edited): edited_data,
            f"cond.{_ext(source)}": source_data,
            "txt": entry["instruction"].strip(),
            "json": json.dumps(meta).encode(),
        }


def _manifest_lines(path: Path) -> list[str]:
    """JSONL lines, or one JSON line per row of a Parquet manifest (needs pyarrow)."""
    if path.suffix.lower() != ".parquet":
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(
            "Parquet manifests need pyarrow: `pip install pyarrow` (or use a JSONL manifest)"
        ) from err
    return [json.dumps(row, default=str) for row in pq.read_table(path).to_pylist()]


def write_edit_shards(
    manifest: str,
    output: str,
    maxcount: int = 1000,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, int]:
    """Write instructed-editing shards from a JSONL manifest of triples.

    Args:
        manifest: JSONL file, one ``{"source": path, "edited": path, "instruction": str}``
            per line, or a ``.parquet`` file with those three columns (needs pyarrow);
            paths are relative to the manifest's folder.
        output: shard pattern with a printf field, e.g. ``shards/edit-%06d.tar``.
        maxcount: samples per shard.
        progress: show a progress bar.
        max_pixels: skip triples with an image above this many pixels.

    Each sample stores the edited image as the target (``jpg``/``png``/``webp``, bytes as
    they are), the source image as ``cond.<ext>``, the instruction as ``txt`` and the
    sizes, paths and manifest line number in ``json``. Lines that are not JSON objects
    with the three string fields (``skipped_bad_line``), with an empty instruction
    (``skipped_no_instruction``), a missing file (``skipped_missing_file``) or an
    unreadable/too large image are skipped.

    Returns:
        Counts: ``written`` and ``skipped_<reason>`` (also printed).
    """
    path = Path(manifest)
    if not path.is_file():
        raise FileNotFoundError(f"--manifest {manifest!r} is not a file")
    _check_output(output)
    lines = _manifest_lines(path)
    if not any(line.strip() for line in lines):
        raise ValueError(f"--manifest {manifest!r} has no entries (one JSON object per line)")
    samples = _edit_samples(lines, path.parent, max_pixels)
    total = sum(1 for line in lines if line.strip())
    return _write_all(samples, output, maxcount, total, progress, "writing edit shards")
