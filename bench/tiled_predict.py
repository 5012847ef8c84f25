"""Tiled sampling: peak memory against the output size, and the seam error.

    python bench/tiled_predict.py [--ckpt demo_out/checkpoints/last.ckpt] [--sizes 512 1024 2048 4096]

1. Memory. A PE-CoDi module on the tiny latent teacher (``models.write_tiny_teacher``:
   VAE factor 4, a two-level UNet), 4 deterministic steps, square outputs of each size
   (4x super-resolution of inputs a quarter the size), each in a fresh process: the peak
   resident memory while sampling, above the process's peak after the model loaded.
   Tiled: 512 px tiles, 128 px overlap (``model.tiling``); untiled up to 2048 px.
2. Seam error. The demo's checkpoint (pixel-space digits model trained on 32 px crops;
   ``make demo`` writes it) on a 2 x 4 mosaic of the demo's held-out 8x8 inputs, 4x: a
   64x128 output, sampled whole and in 32 px tiles with 8 px overlap (15 tiles). The
   difference to the untiled sample on pixels within 2 px of an inner tile border, and
   elsewhere; docs/tiled_predict.png shows condition | untiled | tiled | 4 x |difference|.

Numbers go to docs/performance.md by hand, with the machine they came from.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one_run(size: int, tiled: bool, teacher: str) -> dict:
    """In this (fresh) process: load, then sample one ``size`` x ``size`` output."""
    from codi_lightning.diffusion import TilingConfig
    from codi_lightning.training import CoDiDistillation

    torch.set_num_threads(2)
    mode = "on" if tiled else "off"
    m = CoDiDistillation(teacher, num_grid=20, tiling=TilingConfig(mode=mode, tile_size=512,
                                                                    overlap=128)).eval()  # fmt: skip
    cond = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    loaded = peak_mb()
    start = time.perf_counter()
    out = m.sample_images(cond, [""], 4, generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - start
    tiles = len(m.tile_grid(size, size)) if tiled else 1
    assert out.shape[-2:] == (size, size)
    return {"size": size, "tiled": tiled, "tiles": tiles, "seconds": round(seconds, 1),
            "loaded_mb": round(loaded), "sampling_peak_mb": round(peak_mb() - loaded)}  # fmt: skip


def memory(sizes: list[int]) -> list[dict]:
    from codi_lightning.testing.tiny import write_tiny_teacher

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher = str(write_tiny_teacher(Path(tmp) / "tiny"))
        for size in sizes:
            for tiled in (False, True):
                if not tiled and size > 2048:
                    continue
                cmd = [sys.executable, __file__, "--one", str(size), "--teacher", teacher]
                if tiled:
                    cmd.append("--tiled")
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                print(row, flush=True)
                rows.append(row)
    return rows


def seams(ckpt: str, lowres: Path) -> dict:
    """Tiled against untiled on a mosaic of the demo's inputs (see the module docstring)."""
    from PIL import Image

    from codi_lightning.data.transforms import to_tensor01
    from codi_lightning.diffusion import TilingConfig
    from codi_lightning.training import CoDiDistillation

    files = sorted(lowres.glob("*.png"))[:8]
    tiles = [to_tensor01(Image.open(f).convert("RGB")) for f in files]
    rows = [torch.cat(tiles[r * 4 : r * 4 + 4], dim=-1) for r in range(2)]
    small = torch.cat(rows, dim=-2)[None]  # 1 x 3 x 16 x 32
    cond = torch.nn.functional.interpolate(small, scale_factor=4, mode="bicubic").clamp(0, 1)
    m = CoDiDistillation.load_from_checkpoint(ckpt, map_location="cpu").eval()
    m.tiling = TilingConfig(mode="off")
    whole = m.sample_images(cond, [""], 4, generator=torch.Generator().manual_seed(0))
    m.tiling = TilingConfig(mode="on", tile_size=32, overlap=8)
    grid = m.tile_grid(*cond.shape[-2:])
    tiled = m.sample_images(cond, [""], 4, generator=torch.Generator().manual_seed(0))
    border = torch.zeros(cond.shape[-2:], dtype=torch.bool)
    v = m.vae_scale
    for ys, xs in grid.regions:
        for edge in (ys.start * v, ys.stop * v):
            if 0 < edge < cond.shape[-2]:
                border[max(0, edge - 2) : edge + 2, :] = True
        for edge in (xs.start * v, xs.stop * v):
            if 0 < edge < cond.shape[-1]:
                border[:, max(0, edge - 2) : edge + 2] = True
    from torchvision.utils import save_image

    panel = torch.cat([cond, whole, tiled, ((tiled - whole).abs() * 4).clamp(0, 1)])
    save_image(panel, REPO / "docs" / "tiled_predict.png", nrow=1, padding=2, pad_value=1.0)
    diff = (tiled - whole).abs().mean(dim=(0, 1))
    return {"tiles": len(grid), "output": list(cond.shape[-2:]),
            "mean_abs_diff_border": round(float(diff[border].mean()), 4),
            "mean_abs_diff_elsewhere": round(float(diff[~border].mean()), 4),
            "max_abs_diff": round(float(diff.max()), 4)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--ckpt", default=str(REPO / "demo_out" / "checkpoints" / "last.ckpt"))
    parser.add_argument("--seams-only", action="store_true", help="skip the memory runs")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tiled", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one, args.tiled, args.teacher)))
        return
    ckpt = Path(args.ckpt)
    if ckpt.is_file():
        print("seams:", seams(str(ckpt), ckpt.parents[1] / "lowres"), flush=True)
    else:
        print(f"no {ckpt}: run `make demo` for the seam measurement", flush=True)
    if not args.seams_only:
        memory(args.sizes)


if __name__ == "__main__":
    main()
