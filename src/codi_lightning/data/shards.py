"""Write WebDataset shards from a folder of images (``codi-lightning shards``)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from .decode import IMAGE_EXTS


def _images(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS
    )


def _key(rel: Path) -> str:
    """A WebDataset key from a relative path: no dots (they start the extension)."""
    return re.sub(r"[^A-Za-z0-9_\-/]", "_", str(rel.with_suffix(""))).replace("/", "__")


def _ext(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def write_shards(
    images: str,
    output: str,
    conditions: str | None = None,
    maxcount: int = 1000,
    progress: bool = True,
) -> dict[str, int]:
    """Write shards of (image, optional condition, optional caption) from a folder.

    Args:
        images: folder of target images (searched recursively; jpg, png, webp).
        output: shard pattern with a printf field, e.g. ``shards/train-%06d.tar``.
        conditions: optional parallel folder holding a condition image with the same
            relative path and stem as each target (any image extension).
        maxcount: samples per shard.
        progress: show a progress bar.

    Captions come from a side file ``<stem>.txt`` next to the image. Image bytes are
    stored as they are (no re-encoding); ``json`` holds width, height and the source path.

    Returns:
        Counts: ``written`` and ``skipped_<reason>``.
    """
    root = Path(images)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {images!r} is not a folder")
    if "%" not in output:
        raise ValueError(
            f"--output {output!r} needs a shard number field, e.g. 'out/train-%06d.tar'"
        )
    cond_root = Path(conditions) if conditions else None
    if cond_root is not None and not cond_root.is_dir():
        raise FileNotFoundError(f"--conditions {conditions!r} is not a folder")
    files = _images(root)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTS)} images under {images!r}")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    with wds.ShardWriter(output, maxcount=maxcount, verbose=0) as sink:
        for path in tqdm(files, desc="writing shards", unit="img", disable=not progress):
            rel = path.relative_to(root)
            try:
                with Image.open(path) as img:
                    width, height = img.size
                    img.verify()
            except Exception:
                counts["skipped_unreadable"] += 1
                continue
            sample = {
                "__key__": _key(rel),
                _ext(path): path.read_bytes(),
                "json": json.dumps({"width": width, "height": height, "source": str(rel)}).encode(),
            }
            caption = path.with_suffix(".txt")
            if caption.is_file():
                sample["txt"] = caption.read_text(encoding="utf-8", errors="replace").strip()
            if cond_root is not None:
                found = [c for c in (cond_root / rel).parent.glob(path.stem + ".*")
                         if c.suffix.lower().lstrip(".") in IMAGE_EXTS]  # fmt: skip
                if not found:
                    counts["skipped_no_condition"] += 1
                    continue
                sample[f"cond.{_ext(found[0])}"] = found[0].read_bytes()
            sink.write(sample)
            counts["written"] += 1
    summary = {"written": counts["written"], **{k: v for k, v in counts.items() if k != "written"}}
    print(f"shards: {json.dumps(summary)} -> {output}")
    return summary
