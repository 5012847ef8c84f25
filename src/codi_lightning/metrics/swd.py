"""Sliced Wasserstein distance over Laplacian-pyramid patches (Karras et al., ICLR 2018).

For each pyramid level, 7x7 patches of real and generated images are flattened into
descriptors (at random positions drawn once per level from the seed, the same in every
image, so the value does not depend on batching, order or ranks), each set is
normalised per channel, and the Wasserstein-1 distance between their 1-D projections on
random unit directions is averaged. Needs no weights:
it compares local colour and texture statistics at each scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric


def _gaussian_kernel(device: torch.device) -> Tensor:
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=device)
    k = torch.outer(k, k)
    return (k / k.sum()).expand(3, 1, 5, 5)


def laplacian_pyramid(images: Tensor, levels: int) -> list[Tensor]:
    """Band-pass levels (finest first) and the low-pass residual, images [B, 3, H, W]."""
    kernel = _gaussian_kernel(images.device)
    out, current = [], images
    for _ in range(levels - 1):
        low = F.conv2d(F.pad(current, (2, 2, 2, 2), mode="reflect"), kernel, groups=3)[
            ..., ::2, ::2
        ]
        up = F.interpolate(low, size=current.shape[-2:], mode="bilinear", align_corners=False)
        out.append(current - up)
        current = low
    out.append(current)
    return out


def _patches(level: Tensor, count: int, size: int, generator: torch.Generator) -> Tensor:
    """``count`` patches of ``size`` px from every image, at the same positions in each."""
    b, c, h, w = level.shape
    ys = torch.randint(0, h - size + 1, (count,), generator=generator).to(level.device)
    xs = torch.randint(0, w - size + 1, (count,), generator=generator).to(level.device)
    ys, xs = ys.expand(b, count), xs.expand(b, count)
    offsets = torch.arange(size, device=level.device)
    rows = (ys[..., None] + offsets)[..., :, None].expand(b, count, size, size)
    cols = (xs[..., None] + offsets)[..., None, :].expand(b, count, size, size)
    batch = torch.arange(b, device=level.device)[:, None, None, None].expand_as(rows)
    patches = level.permute(0, 2, 3, 1)[batch, rows, cols]  # [B, count, size, size, C]
    return patches.permute(0, 1, 4, 2, 3).reshape(b * count, c * size * size)


def _normalise(desc: Tensor, channels: int = 3) -> Tensor:
    d = desc.view(desc.shape[0], channels, -1)
    mean = d.mean(dim=(0, 2), keepdim=True)
    std = d.std(dim=(0, 2), keepdim=True).clamp_min(1e-8)
    return ((d - mean) / std).view_as(desc)


def sliced_wasserstein(
    a: Tensor, b: Tensor, directions: int = 128, repeats: int = 4, seed: int = 0
) -> Tensor:
    """Mean W1 distance between projections of descriptor sets ``a`` and ``b`` [N, D]."""
    gen = torch.Generator().manual_seed(seed)
    n = min(len(a), len(b))
    results = []
    for _ in range(repeats):
        dirs = torch.randn(a.shape[1], directions, generator=gen).to(a)
        dirs = dirs / dirs.norm(dim=0, keepdim=True)
        pa, _ = (a[:n] @ dirs).sort(dim=0)
        pb, _ = (b[:n] @ dirs).sort(dim=0)
        results.append((pa - pb).abs().mean())
    return torch.stack(results).mean()


class SlicedWassersteinDistance(Metric):
    """SWD x 1e3 averaged over Laplacian levels, images in [0, 1] [B, 3, H, W]."""

    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        levels: int = 3,
        patch_size: int = 7,
        patches_per_image: int = 64,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.levels, self.patch_size, self.per_image = levels, patch_size, patches_per_image
        self.seed = seed
        for i in range(levels):
            self.add_state(f"real_{i}", default=[], dist_reduce_fx="cat")
            self.add_state(f"fake_{i}", default=[], dist_reduce_fx="cat")

    def update(self, images: Tensor, real: bool) -> None:
        pyramid = laplacian_pyramid(images.float() * 2 - 1, self.levels)
        for i, level in enumerate(pyramid):
            if min(level.shape[-2:]) < self.patch_size:
                raise ValueError(
                    f"image too small for {self.levels} SWD levels with {self.patch_size}px patches"
                )
            positions = torch.Generator().manual_seed(self.seed + 1000 * i)  # per level
            desc = _patches(level, self.per_image, self.patch_size, positions)
            getattr(self, f"{'real' if real else 'fake'}_{i}").append(desc)

    def compute(self) -> Tensor:
        values = []
        for i in range(self.levels):
            real, fake = getattr(self, f"real_{i}"), getattr(self, f"fake_{i}")
            real = torch.cat(real) if isinstance(real, list) else real
            fake = torch.cat(fake) if isinstance(fake, list) else fake
            values.append(
                sliced_wasserstein(_normalise(real), _normalise(fake), seed=self.seed + i)
            )
        return torch.stack(values).mean() * 1e3
