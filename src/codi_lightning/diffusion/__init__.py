"""Diffusion math of CoDi as pure functions. Imports torch only."""

from .boundary import apply_boundary, boundary_scalings
from .ema import ema_update
from .losses import CoDiLossConfig, codi_loss, diffusion_loss, distance
from .parameterization import to_output, to_x_eps
from .sampling import guided_output, randn, sample
from .schedule import (
    FlowSchedule,
    NoiseSchedule,
    betas_from_config,
    schedule_from_config,
    vp_view_of_flow,
)
from .solvers import ode_step
from .tiling import (
    TileGrid,
    TilingConfig,
    pad_to_multiple,
    padded_size,
    tiled_denoiser,
    tiled_over,
)
from .timesteps import grid, sample_pairs, sampling_timesteps, step_ratio

__all__ = [
    "CoDiLossConfig",
    "FlowSchedule",
    "NoiseSchedule",
    "TileGrid",
    "TilingConfig",
    "apply_boundary",
    "betas_from_config",
    "boundary_scalings",
    "codi_loss",
    "diffusion_loss",
    "distance",
    "ema_update",
    "grid",
    "guided_output",
    "ode_step",
    "pad_to_multiple",
    "padded_size",
    "randn",
    "sample",
    "sample_pairs",
    "sampling_timesteps",
    "schedule_from_config",
    "step_ratio",
    "tiled_denoiser",
    "tiled_over",
    "vp_view_of_flow",
    "to_output",
    "to_x_eps",
]
