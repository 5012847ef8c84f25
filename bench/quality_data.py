"""Patches from real photographs that ship with scikit-image, as WebDataset shards.

Training patches come from thirteen photographs, held-out test patches from two OTHER
photographs, so the test measures generalisation to unseen images. The split is chosen
so that the training photographs cover the test's colours (sky blue, skin, white, dark
interiors): an earlier split trained on warm textures only (skin, retina, coffee, a cat,
tissue) and tested on a blue-sky rocket, and the teacher's prior then pulled every
output towards orange whatever the condition said. Photographs are downscaled by 2 first
(more structure per 32 px patch); grey-scale photographs are repeated to RGB and give
half as many patches.

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
    "rocket",
    "immunohistochemistry",
    "retina",
    "hubble_deep_field",
)
GREY_TRAIN_PHOTOS = ("camera", "brick", "grass", "gravel", "moon", "coins")
# grace_hopper ships with matplotlib (mpl-data/sample_data), the rest with scikit-image
TEST_PHOTOS = ("stereo_motorcycle", "grace_hopper")


def photo(name: str) -> Image.Image:
    if name == "grace_hopper":
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as fh:
            img = Image.open(fh).convert("RGB")
    else:
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
    out: str, train_per_photo: int = 1600, test_per_photo: int = 256, size: int = 32
) -> dict:
    rng = np.random.default_rng(0)
    counts = {n: train_per_photo for n in TRAIN_PHOTOS}
    counts.update({n: train_per_photo // 2 for n in GREY_TRAIN_PHOTOS})
    train = [
        (f"{n}_{i:05d}", p)
        for n, count in counts.items()
        for i, p in enumerate(patches(photo(n), count, size, rng))
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
        "train_photos": TRAIN_PHOTOS + GREY_TRAIN_PHOTOS,
        "test_photos": TEST_PHOTOS,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench_out/data")
    print(prepare(parser.parse_args().out))
