"""Consistency-model boundary condition, LCM-compatible (METHOD.md, "Boundary condition")."""

from __future__ import annotations

from torch import Tensor

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def boundary_scalings(
    t: Tensor, sigma_data: float = SIGMA_DATA, timestep_scaling: float = TIMESTEP_SCALING
) -> tuple[Tensor, Tensor]:
    """``(c_skip, c_out)`` at integer timesteps ``t``.

    ``c_skip = sd^2 / ((s t)^2 + sd^2)``, ``c_out = s t / sqrt((s t)^2 + sd^2)``; so
    ``c_skip(0) = 1`` and ``c_out(0) = 0``. Same numbers as diffusers'
    ``LCMScheduler.get_scalings_for_boundary_condition_discrete``.
    """
    st = t.double() * timestep_scaling
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def apply_boundary(z: Tensor, x_hat: Tensor, t: Tensor, **kwargs: float) -> Tensor:
    """``f(z_t, t) = c_skip(t) z_t + c_out(t) x_hat``; ``t`` is [B] or a scalar."""
    c_skip, c_out = boundary_scalings(t, **kwargs)
    shape = (-1,) + (1,) * (z.ndim - 1) if c_skip.ndim else (1,) * z.ndim
    c_skip = c_skip.to(device=z.device, dtype=z.dtype).reshape(shape)
    c_out = c_out.to(device=z.device, dtype=z.dtype).reshape(shape)
    return c_skip * z + c_out * x_hat
