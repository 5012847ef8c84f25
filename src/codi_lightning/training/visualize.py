"""Image grids for people to look at."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image


def save_grid(
    columns: list[Tensor], path: str | Path, padding: int = 2, min_size: int = 96
) -> Tensor:
    """Lay out columns of images in [0, 1] (each [B, 3, H, W], same size) as rows, one
    sample per row, save a PNG at ``path`` and return the grid [3, H', W'].

    Tiles smaller than ``min_size`` are enlarged (nearest neighbour) so they can be seen.
    """
    images = torch.stack([col.detach().float().cpu() for col in columns], dim=1)  # [B, C, 3, H, W]
    side = images.shape[-1]
    if side < min_size:
        factor = -(-min_size // side)
        images = images.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2)
    grid = make_grid(images.flatten(0, 1), nrow=len(columns), padding=padding, pad_value=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return grid
