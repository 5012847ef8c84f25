"""Helpers for the data tests: encoded images and hand-made tars, all generated offline
(imported by the test modules of this folder)."""

from __future__ import annotations

import io
import struct
import tarfile
import threading
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def structured(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    """A smooth, asymmetric RGB picture: gradients plus a few blocks (so crops, flips and
    misalignments are visible after blurring)."""
    w, h = size
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    arr = np.concatenate([x.repeat(h, 0), y.repeat(w, 1), (0.5 * x + 0.5 * y)], axis=2)
    for _ in range(4):
        bw, bh = rng.integers(w // 6, w // 3), rng.integers(h // 6, h // 3)
        left, top = rng.integers(0, w - bw), rng.integers(0, h - bh)
        arr[top : top + bh, left : left + bw] = rng.random(3)
    return Image.fromarray((arr * 255).round().astype(np.uint8), "RGB")


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def solid(color=(255, 0, 0), size=(40, 30), mode="RGB", fmt="PNG") -> bytes:
    """An encoded solid image."""
    return encode(Image.new(mode, size, color), fmt)


def first_batch(dm, seconds: float = 60.0) -> dict:
    """The first training batch, or the error it raised; fails (instead of hanging the
    test run) when none comes within ``seconds``."""
    result: dict = {}

    def run() -> None:
        try:
            result["batch"] = next(iter(dm.train_dataloader()))
        except Exception as err:  # handed to the test thread
            result["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no batch and no error within {seconds} s: the stream hangs"
    if "error" in result:
        raise result["error"]
    return result["batch"]
