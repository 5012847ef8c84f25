"""Prepare the CPU demo: shards of generated images and low-resolution inputs.

``python -m codi_lightning.demo --out demo_out`` writes ``demo_out/shards/{train,val}-*.tar``
and ``demo_out/lowres/``; the teacher is the committed toy teacher. No network needed.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .data import write_shards

COLORS = ["red", "green", "blue", "orange", "purple", "yellow", "white", "cyan"]
SHAPES = ["circle", "square", "stripes"]


def synthetic_image(rng: np.random.Generator, size: int = 64) -> tuple[Image.Image, str]:
    """A smooth background with a coloured shape; returns the image and its caption."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    base = rng.uniform(40, 200, size=3)
    bg = np.clip(base[None, None] + 60 * ramp[..., None], 0, 255).astype(np.uint8)
    img = Image.fromarray(bg)
    draw = ImageDraw.Draw(img)
    color, shape = rng.choice(COLORS), rng.choice(SHAPES)
    cx, cy, r = (int(v) for v in rng.integers([16, 16, 8], [48, 48, 20]))
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
        for x0 in range(0, size, 8):
            draw.rectangle([x0, 0, x0 + 3, size], fill=color)
    return img, f"a {color} {shape}"


def write_image_folder(folder: Path, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img, caption = synthetic_image(rng)
        img.save(folder / f"img{i:05d}.png")
        (folder / f"img{i:05d}.txt").write_text(caption)


TOY_TEACHER = Path("bench/assets/toy_teacher")


def prepare(out: str | Path, train_images: int = 512, val_images: int = 16) -> Path:
    """Train/val shards and 8x8 low-resolution inputs for ``predict``. The teacher is the
    committed toy teacher (pretrained on photo patches by ``configs/toy/teacher.yaml``)."""
    out = Path(out)
    if not (TOY_TEACHER / "unet").is_dir():
        raise FileNotFoundError(
            f"{TOY_TEACHER} is missing: run the demo from the repository root, or make the "
            "teacher with `codi-lightning fit --config configs/toy/teacher.yaml`"
        )
    with tempfile.TemporaryDirectory() as tmp:
        for split, count, seed in (("train", train_images, 0), ("val", val_images, 1)):
            folder = Path(tmp) / split
            write_image_folder(folder, count, seed)
            write_shards(str(folder), str(out / "shards" / f"{split}-%06d.tar"), maxcount=128)
    lowres = out / "lowres"
    lowres.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    for i in range(8):
        img, _ = synthetic_image(rng)
        img.resize((8, 8), Image.BICUBIC).save(lowres / f"input{i}.png")
    return out


def report(out: str | Path) -> str:
    """Where the demo's logs, checkpoints and newest sample grid are."""
    out = Path(out)
    grids = sorted((out / "logs").rglob("samples/*.png"), key=lambda p: p.stat().st_mtime)
    if not grids:
        raise FileNotFoundError(f"no sample grid under {out / 'logs'}: did the fit run?")
    metrics = sorted((out / "logs").rglob("metrics.md"), key=lambda p: p.stat().st_mtime)
    return "\n".join(
        [
            "demo finished.",
            f"  sample grid (condition | 1 | 2 | 4 steps | target): {grids[-1]}",
            f"  checkpoints: {out / 'checkpoints'}",
            *([f"  test metrics: {metrics[-1]}"] if metrics else []),
            f"  4x upscaled predictions of {out / 'lowres'}: {out / 'predictions'}",
            f"  TensorBoard: tensorboard --logdir {out / 'logs'}",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--report", action="store_true", help="print where the results are")
    args = parser.parse_args()
    if args.report:
        print(report(args.out))
        return
    out = prepare(args.out)
    print(f"demo data ready in {out}")


if __name__ == "__main__":
    main()
