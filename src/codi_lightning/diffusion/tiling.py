"""Any output size: padding to the network's multiple and tiled sampling.

Tiled sampling follows MultiDiffusion (Bar-Tal et al., ICML 2023), as the tiled
super-resolution samplers of the field do (StableSR, OSEDiff): the latent is covered by
overlapping tiles, the network runs on each tile, and the output at every step is the
weighted mean of the overlapping tiles' outputs, so neighbouring tiles agree at every step
rather than being stitched at the end. The samplers' per-step update is pointwise in z, so
averaging the network outputs is the same as averaging the tiles' updated latents.

The weights are 1 inside a tile and ramp linearly across the overlap with each neighbour,
so where one tile covers the whole latent the tiled denoiser returns the network's output
unchanged (``o * 1 / 1``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]
Region = tuple[slice, slice]


@dataclass(frozen=True)
class TilingConfig:
    """When and how large outputs are sampled in tiles (all sizes in output pixels).

    Attributes:
        mode: ``auto`` (tile outputs of more than ``untiled_max_pixels`` pixels), ``on``
            (always tile; an output no larger than a tile is one tile) or ``off``.
        tile_size: side of a tile; None: the run's ``data.resolution`` (the size the model
            was trained at). Rounded down to the network's multiple.
        overlap: pixels shared by neighbouring tiles; None: a quarter of ``tile_size``.
        untiled_max_pixels: the memory budget of ``auto``, as the largest output (height x
            width) sampled in one pass. docs/performance.md has the memory it takes.
    """

    mode: Literal["auto", "on", "off"] = "auto"
    tile_size: int | None = None
    overlap: int | None = None
    untiled_max_pixels: int = 1024 * 1024

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "on", "off"):
            raise ValueError(f"tiling.mode={self.mode!r}; choose 'auto', 'on' or 'off'")
        if self.tile_size is not None and self.tile_size <= 0:
            raise ValueError(f"tiling.tile_size={self.tile_size} must be positive (e.g. 512)")
        if self.overlap is not None and self.overlap < 0:
            raise ValueError(f"tiling.overlap={self.overlap} must be >= 0 (e.g. 64)")
        if self.untiled_max_pixels <= 0:
            raise ValueError(
                f"tiling.untiled_max_pixels={self.untiled_max_pixels} must be positive "
                "(e.g. 1048576 for 1024 x 1024)"
            )

    def wants_tiles(self, height: int, width: int) -> bool:
        """Whether an output of ``height`` x ``width`` pixels is sampled in tiles."""
        if self.mode == "auto":
            return height * width > self.untiled_max_pixels
        return self.mode == "on"

    def grid(
        self, height: int, width: int, vae_scale: int, unit: int, default_tile: int
    ) -> TileGrid:
        """The latent tiles of a padded ``height`` x ``width`` pixel output: tiles of
        ``tile_size`` (else ``default_tile``) pixels, ``overlap`` (else a quarter tile),
        both in latent pixels (``vae_scale`` pixels each) on multiples of ``unit``."""
        tile = self.tile_size or default_tile
        overlap = self.overlap if self.overlap is not None else tile // 4
        return TileGrid(height // vae_scale, width // vae_scale, max(tile // vae_scale, unit),
                        overlap // vae_scale, unit)  # fmt: skip


def padded_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """The smallest size of at least ``height`` x ``width`` whose sides are multiples."""
    return math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple


def pad_to_multiple(images: Tensor, multiple: int) -> Tensor:
    """Pad [B, C, H, W] at the bottom and right to sides that are multiples of
    ``multiple``: reflected where the image is large enough (the content continues
    across the border), else the edge row or column repeated. Crop the result back with
    ``[..., :H, :W]``."""
    h, w = images.shape[-2:]
    ph, pw = padded_size(h, w, multiple)
    if (ph, pw) == (h, w):
        return images
    mode = "reflect" if ph - h < h and pw - w < w else "replicate"
    return F.pad(images, (0, pw - w, 0, ph - h), mode=mode)


def tile_starts(length: int, tile: int, overlap: int, unit: int = 1) -> list[int]:
    """Start offsets of tiles of ``tile`` along an axis of ``length`` (both multiples of
    ``unit``): as few tiles as keep at least ``overlap`` between neighbours, spread
    evenly from 0 to ``length - tile`` with starts on multiples of ``unit``. One tile
    (start 0, the whole axis) when ``length <= tile``."""
    if length <= tile:
        return [0]
    overlap = min(overlap, tile - unit)
    n = math.ceil((length - overlap) / (tile - overlap))
    span = length - tile
    starts = sorted({round(i * span / (n - 1) / unit) * unit for i in range(n)})
    return starts


def _axis_weights(starts: list[int], tile: int, length: int) -> list[Tensor]:
    """1-D blend weights of each tile: 1, ramping linearly to the tile's edge across its
    overlap with each neighbour (so two overlapping tiles' weights sum to 1)."""
    size = min(tile, length)
    weights = []
    for i, start in enumerate(starts):
        w = torch.ones(size, dtype=torch.float64)
        if i > 0:
            ov = starts[i - 1] + size - start
            if ov > 0:
                w[:ov] = torch.minimum(
                    w[:ov], torch.arange(1, ov + 1, dtype=torch.float64) / (ov + 1)
                )
        if i + 1 < len(starts):
            ov = start + size - starts[i + 1]
            if ov > 0:
                ramp = torch.arange(ov, 0, -1, dtype=torch.float64) / (ov + 1)
                w[size - ov :] = torch.minimum(w[size - ov :], ramp)
        weights.append(w)
    return weights


class TileGrid:
    """Overlapping tiles of a ``height`` x ``width`` latent and their blend weights.

    Args:
        height, width: the latent's size (multiples of ``unit``).
        tile: tile side in latent pixels (rounded down to a multiple of ``unit``).
        overlap: latent pixels shared by neighbours (at least; even spacing may add some).
        unit: the network's own multiple in the latent (UNet downsampling, transformer
            patch); tile sizes and starts are multiples of it.
    """

    def __init__(self, height: int, width: int, tile: int, overlap: int, unit: int = 1) -> None:
        tile = max(unit, tile // unit * unit)
        self.height, self.width, self.tile = height, width, tile
        rows = tile_starts(height, tile, overlap, unit)
        cols = tile_starts(width, tile, overlap, unit)
        th, tw = min(tile, height), min(tile, width)
        wy, wx = _axis_weights(rows, tile, height), _axis_weights(cols, tile, width)
        self.regions: list[Region] = []
        self.weights: list[Tensor] = []
        for r, row_w in zip(rows, wy, strict=True):
            for c, col_w in zip(cols, wx, strict=True):
                self.regions.append((slice(r, r + th), slice(c, c + tw)))
                self.weights.append((row_w[:, None] * col_w[None, :]).float())
        total = torch.zeros(height, width)
        for (ys, xs), w in zip(self.regions, self.weights, strict=True):
            total[ys, xs] += w
        self.total = total

    def __len__(self) -> int:
        return len(self.regions)


def tiled_denoiser(model_for: Callable[[slice, slice], Denoiser], grid: TileGrid) -> Denoiser:
    """A ``(z, t) -> o`` denoiser over the whole latent that runs ``model_for(ys, xs)``
    (the network with its condition cropped to the latent region ``ys, xs``) on each tile
    of ``grid`` and returns the weighted mean of the overlapping outputs (MultiDiffusion)."""

    def model(z: Tensor, t: Tensor) -> Tensor:
        out = total = None
        for (ys, xs), weight in zip(grid.regions, grid.weights, strict=True):
            o = model_for(ys, xs)(z[..., ys, xs], t).float()
            if out is None:
                out = o.new_zeros((*o.shape[:-2], grid.height, grid.width))
                total = grid.total.to(o.device)
            out[..., ys, xs] += o * weight.to(o.device)
        return out / total

    return model


def tiled_over(
    make: Callable[[Tensor, tuple[int, int, int, int]], Denoiser],
    cond: Tensor,
    grid: TileGrid,
    vae_scale: int,
    size: tuple[int, int],
) -> Denoiser:
    """:func:`tiled_denoiser` for a network whose condition ``cond`` covers the latent
    at any multiple of its size (pixels for a ControlNet, latents for SD3/Flux):
    ``make(cond_crop, (top, left, height, width))`` builds the denoiser of one tile from
    its crop of ``cond`` and its box in the ``size`` (height, width) output, in pixels
    (the box stops at the output's edge; the padding beyond it is not part of it)."""
    per_latent = cond.shape[-2] // grid.height  # condition pixels per latent pixel

    def model_for(ys: slice, xs: slice) -> Denoiser:
        crop = cond[..., ys.start * per_latent : ys.stop * per_latent,
                    xs.start * per_latent : xs.stop * per_latent]  # fmt: skip
        top, left = ys.start * vae_scale, xs.start * vae_scale
        box = (top, left, min(ys.stop * vae_scale, size[0]) - top,
               min(xs.stop * vae_scale, size[1]) - left)  # fmt: skip
        return make(crop, box)

    return tiled_denoiser(model_for, grid)


__all__ = [
    "TileGrid",
    "TilingConfig",
    "pad_to_multiple",
    "padded_size",
    "tile_starts",
    "tiled_denoiser",
    "tiled_over",
]
