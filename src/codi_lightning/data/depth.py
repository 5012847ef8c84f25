"""Depth-to-image shards: depth maps estimated at write time (``codi-lightning depth-shards``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .decode import DEFAULT_MAX_PIXELS, BadSample, decode_image, image_error
from .shards import Skipped, _check_output, _ext, _image_folder, _key, _png, _read, _write_all


def load_depth_estimator(name: str, device: torch.device):
    """A transformers depth estimator and its image processor (hub id or folder)."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    try:
        model = AutoModelForDepthEstimation.from_pretrained(name)
        processor = AutoImageProcessor.from_pretrained(name)
    except OSError as err:
        raise OSError(
            f"--depth_model {name!r} could not be loaded: give a hub id (e.g. "
            "'Intel/dpt-hybrid-midas') with network access, or a local folder holding the "
            "model and its preprocessor_config.json"
        ) from err
    return model.to(device).eval(), processor


@torch.no_grad()
def estimate_depth(model, processor, images: list[Image.Image]) -> list[Image.Image]:
    """Depth maps as 3-channel 8-bit images of each input's size, min-max normalised per
    image (near = bright for inverse-depth estimators such as DPT/MiDaS)."""
    inputs = processor(images=images, return_tensors="pt").to(next(model.parameters()).device)
    predicted = model(**inputs).predicted_depth.float()  # [B, h, w]
    maps = []
    for depth, image in zip(predicted, images, strict=True):
        size = (image.height, image.width)
        d = F.interpolate(depth[None, None], size=size, mode="bicubic", align_corners=False)[0, 0]
        span = d.max() - d.min()  # estimators differ wildly in scale: normalise by range
        d = (d - d.min()) / span if span > 0 else torch.zeros_like(d)
        gray = (d * 255).round().byte().cpu().numpy()
        maps.append(Image.fromarray(np.stack([gray] * 3, axis=-1)))
    return maps


def _depth_samples(
    root: Path, files: list[Path], model, processor, batch_size: int, model_name: str,
    max_pixels: int,
) -> Iterator[dict[str, Any] | Skipped]:  # fmt: skip
    batch: list[tuple[Path, bytes, Image.Image]] = []

    def flush() -> Iterator[dict[str, Any]]:
        maps = estimate_depth(model, processor, [img for _, _, img in batch])
        for (path, data, img), depth in zip(batch, maps, strict=True):
            rel = path.relative_to(root)
            meta = {"width": img.width, "height": img.height, "source": str(rel),
                    "cond": {"recipe": "depth", "depth_model": model_name}}  # fmt: skip
            sample = {"__key__": _key(rel), _ext(path): data, "cond.png": _png(depth),
                      "json": json.dumps(meta).encode()}  # fmt: skip
            caption = path.with_suffix(".txt")
            if caption.is_file():
                sample["txt"] = caption.read_text(encoding="utf-8", errors="replace").strip()
            yield sample
        batch.clear()

    for path in files:
        rel = str(path.relative_to(root))
        try:
            data, _ = _read(path, max_pixels)
            image = decode_image(data, max_pixels)
        except BadSample as err:
            yield Skipped(rel, err.reason, err.detail)
            continue
        except Exception as err:  # pixel data that verify() let through but cannot decode
            yield Skipped(rel, "unreadable", f"not a readable image ({image_error(err)})")
            continue
        batch.append((path, data, image))
        if len(batch) == batch_size:
            yield from flush()
    if batch:
        yield from flush()


def write_depth_shards(
    images: str,
    output: str,
    depth_model: str = "Intel/dpt-hybrid-midas",
    batch_size: int = 16,
    device: str = "auto",
    maxcount: int = 1000,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, int]:
    """Write depth-to-image shards: each target image with its estimated depth map as
    ``cond.png`` (3-channel, 8-bit, the image's size) and its side ``<stem>.txt`` caption.

    Args:
        images: folder of target images (searched recursively; jpg, png, webp).
        output: shard pattern with a printf field, e.g. ``shards/depth-%06d.tar``.
        depth_model: transformers depth estimator (hub id or local folder).
        batch_size: images per estimator batch.
        device: ``auto`` (CUDA if present), ``cuda`` or ``cpu``.
        maxcount: samples per shard.
        progress: show a progress bar.
        max_pixels: skip images with more pixels than this.

    Returns:
        Counts: ``written`` and ``skipped_<reason>`` (also printed).
    """
    _check_output(output)
    root, files = _image_folder(images)
    if batch_size < 1:
        raise ValueError(f"--batch_size {batch_size} must be >= 1")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = load_depth_estimator(depth_model, torch.device(device))
    samples = _depth_samples(root, files, model, processor, batch_size, depth_model, max_pixels)
    return _write_all(samples, output, maxcount, len(files), progress, "estimating depth")
