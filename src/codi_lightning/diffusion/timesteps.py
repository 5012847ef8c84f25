"""The distillation grid and sampling timesteps (METHOD.md, "Timestep grid", "Sampling")."""

from __future__ import annotations

import torch
from torch import Tensor


def step_ratio(num_train_timesteps: int, num_grid: int) -> int:
    """``k = T // N``."""
    if not 1 <= num_grid <= num_train_timesteps:
        raise ValueError(f"grid size N={num_grid} must lie in [1, T={num_train_timesteps}]")
    return num_train_timesteps // num_grid


def grid(num_train_timesteps: int = 1000, num_grid: int = 50) -> Tensor:
    """The N grid points ``{k-1, 2k-1, ..., N k - 1}`` (int64, ascending).

    Same convention as diffusers' DDIMSolver / LCMScheduler ``original_inference_steps``.
    """
    k = step_ratio(num_train_timesteps, num_grid)
    return torch.arange(1, num_grid + 1, dtype=torch.int64) * k - 1


def sample_pairs(
    batch_size: int,
    num_train_timesteps: int = 1000,
    num_grid: int = 50,
    per_sample: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw pairs ``(t, s = max(t - k, 0))`` uniformly over the grid, shape ``[B]`` each.

    ``per_sample=False`` shares one t across the batch (the paper's ablation favours it
    for 1-4 step sampling); ``True`` draws one t per sample.
    """
    points = grid(num_train_timesteps, num_grid)
    k = step_ratio(num_train_timesteps, num_grid)
    n = batch_size if per_sample else 1
    idx = torch.randint(
        0, num_grid, (n,), generator=generator, device=generator.device if generator else None
    )
    t = points.to(idx.device)[idx].expand(batch_size).clone()
    s = (t - k).clamp(min=0)
    return t.to(device), s.to(device)


def sampling_timesteps(
    num_steps: int, num_train_timesteps: int = 1000, num_grid: int = 50
) -> list[int]:
    """Descending timesteps ``t_1 > ... > t_S`` for an S-step sampler, taken from the grid.

    Equals ``LCMScheduler.set_timesteps(S, original_inference_steps=N).timesteps``:
    S points at floor-spaced indices of the reversed grid, e.g. [999, 759, 499, 259]
    for N = 50, S = 4.
    """
    if not 1 <= num_steps <= num_grid:
        raise ValueError(f"num_steps={num_steps} must lie in [1, N={num_grid}]")
    reversed_grid = grid(num_train_timesteps, num_grid).flip(0)
    idx = torch.floor(torch.arange(num_steps, dtype=torch.float64) * (num_grid / num_steps)).long()
    return reversed_grid[idx].tolist()
