"""Data throughput: samples/s of one data-loading worker per condition recipe.

    python bench/data_throughput.py                       # 512 px crops, ~2 min on 2 cores
    python bench/data_throughput.py --size 256 --samples 8 --out bench/data.json

Each sample is a JPEG (quality 90, ``--source`` px on the shorter side, a textured
synthetic picture; by default 1.25x and 2x the crop, e.g. 640 and 1024 px for 512 px
crops) decoded with the project's safe decoder as ``ShardDataModule`` decodes it (at
reduced scale where the JPEG is at least twice the crop), resized and randomly cropped
to ``--size`` px, given a condition by one recipe (``crop only``: the condition is the
crop itself, the cost of decoding and cropping; ``sr``: bicubic; ``sr_realesrgan``:
second-order degradation; ``inpaint``: box/stroke mask; ``canny``: edge map), and
collated in batches of 8 uint8 samples, which is what a worker ships (the pixels become
floats after the transfer to the device). One thread, as in a DataLoader worker
(``torch`` uses one thread per worker); multiply by ``data.num_workers`` for a node's
CPU budget, as long as there are cores for them.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from codi_lightning.data import PairTransform, decode_sample, make_recipe
from codi_lightning.data.transforms import collate

RECIPES = ("crop only", "sr", "sr_realesrgan", "inpaint", "canny")


def synthetic_jpegs(count: int, short_side: int, seed: int = 0) -> list[bytes]:
    """``count`` distinct 4:3 JPEGs: smooth colour fields plus fine texture."""
    rng = np.random.default_rng(seed)
    w, h = round(short_side * 4 / 3), short_side
    out = []
    for _ in range(count):
        coarse = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8))
        coarse = coarse.resize((w, h), Image.BICUBIC)
        arr = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 12, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _identity(image, rng: random.Random):
    return image


_identity.takes_pixels = True  # the uint8 crop itself: no conversion to PIL and back


def measure(
    recipe: str, jpegs: list[bytes], size: int, sr_factor: int, seed: int = 0, batch: int = 8
) -> dict:
    """Decode + resize + random crop + the recipe over all ``jpegs``, collated into
    batches of ``batch`` uint8 samples as ``ShardDataModule``'s workers ship them (the
    float conversion runs after the transfer, not in the worker); samples/s."""
    fn = _identity if recipe == "crop only" else make_recipe(recipe, sr_factor)
    transform = PairTransform(size, random_crop=True, hflip=True, recipe=fn, uint8=True)
    rng = random.Random(seed)
    raw = [{"__key__": f"s{i}", "jpg": data} for i, data in enumerate(jpegs)]
    transform(decode_sample(raw[0], draft=size), rng)  # warm-up (imports, allocator)
    start = time.perf_counter()
    done = []
    for sample in raw:
        done.append(transform(decode_sample(sample, draft=size), rng))  # as PairStage
        if len(done) == batch:
            out, done = collate(done), []
    if done:
        out = collate(done)
    seconds = time.perf_counter() - start
    assert out["cond"].shape[1:] == (3, size, size) and out["image"].dtype == torch.uint8
    n = len(raw)
    return {
        "recipe": recipe,
        "samples": n,
        "seconds": round(seconds, 4),
        "samples_per_s": round(n / seconds, 2),
        "ms_per_sample": round(1000 * seconds / n, 2),
    }


def table(rows: list[dict], size: int) -> str:
    """A plain-text table of the measurements."""
    lines = [f"one worker, JPEG -> {size} px crop (1 thread)",
             f"{'source px':<10}{'recipe':<15}{'samples/s':>11}{'ms/sample':>11}"]  # fmt: skip
    lines += [
        f"{r['source']:<10}{r['recipe']:<15}{r['samples_per_s']:>11.1f}{r['ms_per_sample']:>11.1f}"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="crop size in pixels")
    parser.add_argument("--source", type=int, nargs="+", default=None,
                        help="JPEG shorter sides (default: 1.25 x and 2 x size)")  # fmt: skip
    parser.add_argument("--samples", type=int, default=40, help="samples per recipe")
    parser.add_argument("--sr-factor", type=int, default=4)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sources = args.source or [round(args.size * 1.25), args.size * 2]
    rows = []
    for source in sources:
        jpegs = synthetic_jpegs(args.samples, source)
        rows += [{"source": source, **measure(r, jpegs, args.size, args.sr_factor)}
                 for r in args.recipes]  # fmt: skip
    print(table(rows, args.size))
    if args.out:
        record = {"size": args.size, "sources": sources, "rows": rows}
        Path(args.out).write_text(json.dumps(record, indent=1))
    return rows


if __name__ == "__main__":
    main()
