"""Prepare the CPU demo: shards of handwritten digits and low-resolution inputs.

``python -m codi_lightning.demo --out demo_out`` writes ``demo_out/shards/{train,val}-*.tar``
(the digits testbed's 4,000 training digits; 128 of its held-out test digits) and
``demo_out/lowres/`` (8 other held-out digits at 8x8, for ``predict``). The teacher and
the classifier behind the metrics are committed in bench/assets (docs/results_digits.md).
No network needed.

``synthetic_image`` draws the coloured shapes the tests use as quick generated data.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .data.digits import digits, split, write

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


DIGITS_TEACHER = Path("bench/assets/digits_teacher")
DIGITS_CLASSIFIER = Path("bench/assets/digits_classifier/model.safetensors")


def prepare(out: str | Path, val_images: int = 128, inputs: int = 8, factor: int = 4) -> Path:
    """Train/val shards of digits and ``factor``-times downscaled held-out digits for
    ``predict``. The teacher (``configs/digits/teacher.yaml``) and the metrics' classifier
    (``bench/digits_classifier.py``) are committed in bench/assets."""
    out = Path(out)
    for path, how in ((DIGITS_TEACHER / "unet", "codi-lightning fit --config configs/digits/teacher.yaml"),
                      (DIGITS_CLASSIFIER, "python bench/digits_classifier.py")):  # fmt: skip
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: run the demo from the repository root, or make it with `{how}`"
            )
    x, y = digits()
    train, test = split()
    shards = out / "shards"
    names = [f"digit_{i:05d}" for i in range(len(x))]
    write(x[train], y[train], [names[i] for i in train], str(shards / "train-%06d.tar"), 1000)
    val = test[:val_images]
    write(x[val], y[val], [names[i] for i in val], str(shards / "val-%06d.tar"), val_images)
    lowres = out / "lowres"
    lowres.mkdir(parents=True, exist_ok=True)
    for old in lowres.glob("*.png"):  # inputs of an earlier demo would be predicted too
        old.unlink()
    side = x.shape[-1] // factor
    for i in test[val_images : val_images + inputs]:  # held out from training and val
        image = Image.fromarray(x[i]).convert("RGB")
        image.resize((side, side), Image.BICUBIC).save(lowres / f"{names[i]}.png")
    return out


def report(out: str | Path, cli: str = "codi-lightning") -> str:
    """Where the demo's logs, checkpoints and newest sample grid are, and the command that
    opens the page to try the demo's model (``cli``: the command's path)."""
    out = Path(out)
    grids = sorted((out / "logs").rglob("samples/*.png"), key=lambda p: p.stat().st_mtime)
    if not grids:
        raise FileNotFoundError(f"no sample grid under {out / 'logs'}: did the fit run?")
    metrics = sorted((out / "logs").rglob("metrics.md"), key=lambda p: p.stat().st_mtime)
    tests = sorted((out / "logs").rglob("test_samples.png"), key=lambda p: p.stat().st_mtime)
    return "\n".join(
        [
            "demo finished.",
            f"  validation grid (condition | 1 | 2 | 4 steps | target): {grids[-1]}",
            f"  checkpoints: {out / 'checkpoints'}",
            *([f"  test metrics: {metrics[-1]}"] if metrics else []),
            *(
                [f"  test grid (condition | 1 | 2 | 4 steps | target): {tests[-1]}"]
                if tests
                else []
            ),
            f"  4x upscaled predictions of {out / 'lowres'} (8x8 digits): {out / 'predictions'}",
            f"  TensorBoard: tensorboard --logdir {out / 'logs'}",
            "  try it in the browser (the page opens at http://127.0.0.1:7860):",
            f"    {cli} serve --ckpt_path {out / 'checkpoints' / 'last.ckpt'} "
            f"--examples {out / 'lowres'}",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--report", action="store_true", help="print where the results are")
    parser.add_argument("--cli", default="codi-lightning", help="the command, in the report")
    args = parser.parse_args()
    if args.report:
        print(report(args.out, args.cli))
        return
    out = prepare(args.out)
    print(f"demo data ready in {out}")


if __name__ == "__main__":
    main()
