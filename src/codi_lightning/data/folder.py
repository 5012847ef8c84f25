"""A folder of condition images for ``codi-lightning predict``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from .decode import DEFAULT_MAX_PIXELS, IMAGE_EXTS, BadSample, image_error, open_image, to_rgb
from .transforms import to_tensor01

# what predict reads: the shard formats, GIF (its first frame), BMP and TIFF
PREDICT_EXTS = (*IMAGE_EXTS, "gif", "bmp", "tif", "tiff")
PROMPT_EXT = "txt"  # side prompt files, not inputs
# reasons a predict input is skipped (the writer's summary counts each)
SKIP_REASONS = ("not_an_image_file", "unreadable", "too_large")


class ConditionFolder(Dataset):
    """Condition images (recursively) with optional prompts.

    Each image is scaled by ``upscale`` (bicubic; e.g. 4 for 4x super-resolution, whose
    condition enters at the output resolution) to exactly ``upscale`` times its size; the
    model pads it to its own multiple and crops the result back. The prompt is the side
    file ``<stem>.txt`` if present, else ``prompt``. GIFs give their first frame.

    Each input is written as ``<relative path without extension>.png``; inputs whose
    names would clash (``a.jpg`` and ``a.png``, or names that differ only in case) keep
    their extension (``a.jpg.png``, ``a.png.png``), listed in :attr:`renamed`.

    A file that cannot be used (not an image file, truncated, not decodable, more than
    ``max_pixels`` input or ``max_output_pixels`` output pixels, unreadable) does not
    raise: its item is ``{"name", "source", "error", "reason"}``, which
    ``collate_conditions`` moves to ``batch["skipped"]``, so one bad file does not stop a
    run and is still named in the output (``reason`` is one of :data:`SKIP_REASONS`).

    Args:
        root: the folder (searched recursively).
        prompt: prompt of the images without a side ``<stem>.txt``.
        upscale: scale factor applied to each image.
        max_pixels: skip inputs with more pixels than this (checked from the header,
            before decoding); default ``DEFAULT_MAX_PIXELS``.
        max_output_pixels: skip inputs whose output (``upscale`` x the size) has more
            pixels than this; default ``DEFAULT_MAX_PIXELS``.
    """

    def __init__(
        self, root: str, prompt: str = "", upscale: int = 1, max_pixels: int | None = None,
        max_output_pixels: int | None = None,
    ) -> None:  # fmt: skip
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.predict_images={root!r} is not a folder")
        files = sorted(p for p in self.root.rglob("*") if p.is_file())
        self.files = [p for p in files if _ext(p) != PROMPT_EXT]
        if not any(_ext(p) in PREDICT_EXTS for p in self.files):
            raise FileNotFoundError(
                f"no images under {root!r} (predict reads {', '.join(PREDICT_EXTS)})"
            )
        if upscale < 1:
            raise ValueError(f"data.predict_upscale={upscale} must be >= 1 (4 for 4x SR)")
        self.prompt, self.upscale = prompt, upscale
        self.max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
        self.max_output_pixels = (
            DEFAULT_MAX_PIXELS if max_output_pixels is None else max_output_pixels
        )
        self.names, self.renamed = output_names([self.source(i) for i in range(len(self))])

    def __len__(self) -> int:
        return len(self.files)

    def source(self, index: int) -> str:
        """The input's path relative to the folder, extension included."""
        return self.files[index].relative_to(self.root).as_posix()

    def output_size(self, index: int) -> tuple[int, int] | None:
        """(height, width) of the input's output from its header; None when the header
        cannot be read or the file is not an image (its item is then a skip)."""
        path = self.files[index]
        if _ext(path) not in PREDICT_EXTS:
            return None
        try:
            with Image.open(path) as img:
                w, h = img.size
        except Exception:  # the item names the error
            return None
        return h * self.upscale, w * self.upscale

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``{"cond", "caption", "name", "source"}``, or ``{"name", "source", "error",
        "reason"}`` for a file that is skipped."""
        path, source, name = self.files[index], self.source(index), self.names[index]
        item = {"name": name, "source": source}
        if _ext(path) not in PREDICT_EXTS:
            return {**item, "reason": "not_an_image_file", "error": "not an image file "
                    f"(predict reads {', '.join(PREDICT_EXTS)}; prompts are .txt)"}  # fmt: skip
        try:
            data = path.read_bytes()
        except OSError as err:
            return {**item, "reason": "unreadable",
                    "error": f"unreadable file ({err.strerror or err})"}  # fmt: skip
        try:
            image = self._load(data)
        except BadSample as err:
            reason = "too_large" if err.reason == "too_large" else "unreadable"
            return {**item, "reason": reason, "error": err.detail}
        except Exception as err:  # PIL raises many types for truncated or corrupt data
            return {**item, "reason": "unreadable",
                    "error": f"not a readable image ({image_error(err)})"}  # fmt: skip
        side = path.with_suffix(".txt")
        try:
            prompt = (
                side.read_text(encoding="utf-8", errors="replace").strip()
                if side.is_file()
                else self.prompt
            )
        except OSError as err:
            return {**item, "reason": "unreadable",
                    "error": f"unreadable prompt file {side.name} ({err.strerror})"}  # fmt: skip
        return {**item, "cond": to_tensor01(image), "caption": prompt}

    def _load(self, data: bytes) -> Image.Image:
        return load_condition(data, self.upscale, self.max_pixels, self.max_output_pixels)


def load_condition(
    data: bytes,
    upscale: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_output_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """A predict input's bytes as the RGB condition image: decoded after the input and
    output size checks (``BadSample`` naming the option to raise), scaled by ``upscale``
    (bicubic)."""
    try:
        image = open_image(data, max_pixels)
    except BadSample as err:
        if err.reason == "too_large":
            raise BadSample("too_large", f"{err.detail}; raise data.max_pixels") from err
        raise
    w, h = image.size
    out_w, out_h = w * upscale, h * upscale
    if out_w * out_h > max_output_pixels:
        raise BadSample(
            "too_large",
            f"a {w}x{h} input makes a {out_w}x{out_h} output ({out_w * out_h / 1e6:.1f} MP), "
            f"above data.predict_max_pixels={max_output_pixels}: raise it to predict "
            "this image (large outputs are sampled in tiles, model.tiling)",
        )
    image = to_rgb(image)
    if upscale != 1:
        image = image.resize((out_w, out_h), Image.BICUBIC)
    return image


def _ext(path: Path) -> str:
    return path.suffix.lower().lstrip(".")


def output_names(sources: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Output names (without ``.png``) for input paths: the path without its extension,
    unless that clashes with another input's (case-insensitively, as on macOS and
    Windows file systems), then the path with its extension; a clash left after that
    gets ``~2``, ``~3``, .... Returns the names and ``(source, name)`` of the inputs not
    named by their stem."""
    stems = [str(Path(s).with_suffix("")) if Path(s).suffix else s for s in sources]
    count: dict[str, int] = {}
    for stem in stems:
        count[stem.lower()] = count.get(stem.lower(), 0) + 1
    names = [s if count[stem.lower()] > 1 else stem for s, stem in zip(sources, stems, strict=True)]
    taken: set[str] = set()
    out, renamed = [], []
    for source, stem, name in zip(sources, stems, names, strict=True):
        unique, k = name, 1
        while unique.lower() in taken:
            k += 1
            unique = f"{name}~{k}"
        taken.add(unique.lower())
        out.append(unique)
        if unique != stem:
            renamed.append((source, unique))
    return out, renamed


class SizeGroupedBatches(Sampler[list[int]]):
    """Batches of up to ``batch_size`` of ``indices`` whose outputs have the same size
    (``sizes[i]``; None: unknown, a batch of its own), in the order each size first
    appears, so a folder of mixed sizes batches what it can and never mixes sizes."""

    def __init__(self, indices: Sequence[int], sizes: Sequence[Any], batch_size: int) -> None:
        groups: dict[Any, list[int]] = {}
        for i in indices:
            key = sizes[i] if sizes[i] is not None else ("single", i)
            groups.setdefault(key, []).append(i)
        self.batches = [
            group[k : k + batch_size] for group in groups.values()
            for k in range(0, len(group), batch_size)
        ]  # fmt: skip

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def collate_conditions(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the good samples (``cond``, ``caption``, ``name``, ``source``); the bad
    ones (with an ``error``) go to ``skipped``: ``[{"name", "reason", "detail"}, ...]``
    (``name``: the input's path), always present. Conditions of different sizes (a
    batch not made by :class:`SizeGroupedBatches`) stay a list of [3, H, W] tensors. A
    batch without any good sample has ``cond`` None and empty ``caption`` and ``name``."""
    good = [s for s in samples if "error" not in s]
    skipped = [
        {"name": s["source"], "reason": s["reason"], "detail": s["error"]}
        for s in samples if "error" in s
    ]  # fmt: skip
    if not good:
        return {"cond": None, "caption": [], "name": [], "source": [], "skipped": skipped}
    conds = [s["cond"] for s in good]
    same = len({tuple(c.shape) for c in conds}) == 1
    return {
        "cond": torch.stack(conds) if same else conds,
        "caption": [s["caption"] for s in good],
        "name": [s["name"] for s in good],
        "source": [s["source"] for s in good],
        "skipped": skipped,
    }
