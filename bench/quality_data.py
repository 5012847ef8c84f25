"""Patches from real photographs that ship with scikit-image, as WebDataset shards.

Training patches come from six photographs, held-out test patches from two OTHER
photographs, so the test measures generalisation to unseen images. Photographs are
downscaled by 2 first (more structure per 32 px patch).

    python bench/quality_data.py --out bench_out/data
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

TRAIN_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "immunohistochemistry",
    "retina",
    "hubble_deep_field",
)
TEST_PHOTOS = ("rocket", "stereo_motorcycle")


def photo(name: str) -> Image.Image:
    import skimage.data

    array = getattr(skimage.data, name)()
    if isinstance(array, tuple):  # stereo pairs: the left view
        array = array[0]
    img = Image.fromarray(np.asarray(array)).convert("RGB")
    return img.resize((img.width // 2, img.height // 2), Image.BICUBIC)


def patches(img: Image.Image, count: int, size: int, rng: np.random.Generator) -> list[Image.Image]:
    xs = rng.integers(0, img.width - size + 1, count)
    ys = rng.integers(0, img.height - size + 1, count)
    return [
        img.crop((int(x), int(y), int(x) + size, int(y) + size))
        for x, y in zip(xs, ys, strict=True)
    ]


def write(images: list[tuple[str, Image.Image]], pattern: str, maxcount: int = 2000) -> int:
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for key, img in images:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            meta = {"width": img.width, "height": img.height}
            sink.write({"__key__": key, "png": buf.getvalue(), "txt": "", "json": json.dumps(meta)})
    return len(images)


def prepare(
    out: str, train_per_photo: int = 2500, test_per_photo: int = 256, size: int = 32
) -> dict:
    rng = np.random.default_rng(0)
    train = [
        (f"{n}_{i:05d}", p)
        for n in TRAIN_PHOTOS
        for i, p in enumerate(patches(photo(n), train_per_photo, size, rng))
    ]
    rng.shuffle(train)
    test = [
        (f"{n}_{i:05d}", p)
        for n in TEST_PHOTOS
        for i, p in enumerate(patches(photo(n), test_per_photo, size, rng))
    ]
    root = Path(out)
    n_train = write(train, str(root / "train-%06d.tar"))
    n_test = write(test, str(root / "test-%06d.tar"), maxcount=10_000)
    summary = {
        "train": n_train,
        "test": n_test,
        "train_photos": TRAIN_PHOTOS,
        "test_photos": TEST_PHOTOS,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench_out/data")
    print(prepare(parser.parse_args().out))
