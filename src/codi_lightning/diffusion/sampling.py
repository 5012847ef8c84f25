"""Few-step sampling with the distilled model (METHOD.md, "Sampling")."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .parameterization import to_x_eps
from .schedule import NoiseSchedule
from .solvers import ode_step

Denoiser = Callable[[Tensor, Tensor], Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(
    shape: Sequence[int],
    generator: Generators = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard normal noise of ``shape``. With a list of generators, row i is drawn from
    generator i (as diffusers' ``randn_tensor``), so a sample's noise does not depend on
    the batch it is in."""
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        rows = [
            torch.randn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generator
        ]
        return torch.cat(rows)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def guided_output(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance ``uncond + w (cond - uncond)``."""
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def sample(
    model: Denoiser,
    noise: Tensor,
    schedule: NoiseSchedule,
    timesteps: list[int],
    *,
    stochastic: bool = False,
    generator: Generators = None,
    uncond_model: Denoiser | None = None,
    guidance_scale: float = 1.0,
) -> Tensor:
    """Run the S-step consistency sampler from pure noise ``z_{t_1} = noise``.

    At each ``t_i`` (descending, e.g. from :func:`~.timesteps.sampling_timesteps`):
    predict, apply the boundary condition ``f = c_skip z + c_out x_hat``, then move to
    ``t_{i+1}`` with ``z = alpha f + sigma eps``, where eps is the model's ``eps_hat``
    (deterministic, DDIM-style) or fresh noise (``stochastic=True``: the consistency-model
    multistep sampler, what ``LCMScheduler`` does; ``generator`` may be one per sample).
    After the last step ``f`` is returned.

    With ``uncond_model`` and ``guidance_scale != 1`` the output is guided
    (``uncond + w (cond - uncond)``).
    """
    if not timesteps:
        raise ValueError("timesteps must not be empty")
    z = noise.float()
    batch = z.shape[0]
    for i, t_int in enumerate(timesteps):
        t = torch.full((batch,), int(t_int), device=z.device, dtype=torch.long)
        out = model(z, t).float()
        if uncond_model is not None and guidance_scale != 1.0:
            out = guided_output(out, uncond_model(z, t).float(), guidance_scale)
        alpha, sigma = schedule.alpha_sigma(t, z)
        x_hat, eps_hat = to_x_eps(out, z, alpha, sigma, schedule.prediction_type)
        f = schedule.boundary(z, x_hat, t)
        if i == len(timesteps) - 1:
            return f
        t_next = torch.full_like(t, int(timesteps[i + 1]))
        alpha_n, sigma_n = schedule.alpha_sigma(t_next, z)
        if stochastic:
            eps = randn(z.shape, generator, device=z.device, dtype=z.dtype)
        else:
            eps = eps_hat
        z = ode_step(f, eps, alpha_n, sigma_n)
    raise AssertionError("unreachable")
