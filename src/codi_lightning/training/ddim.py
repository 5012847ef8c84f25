"""Many-step sampling for teachers and the two-stage baseline: DDIM with diffusers'
DDIMScheduler on a VP schedule, the Euler method on a flow schedule (``ode_sample``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor


@torch.no_grad()
def ddim_sample(
    model: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    scheduler_config: Mapping[str, Any],
    num_steps: int,
) -> Tensor:
    """Deterministic DDIM (eta = 0) from pure noise in ``num_steps`` steps.

    Uses "trailing" timestep spacing, so the first step starts at t = T - 1 for every
    step count (the "leading" default of SD's config starts 4-step sampling at t = 751,
    from an image that is not pure noise, which would handicap few-step baselines), and
    ``set_alpha_to_one`` so the last step lands on the clean prediction rather than on
    the noise level of t = 0.
    """
    from diffusers import DDIMScheduler

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    scheduler = DDIMScheduler.from_config(
        config,
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
        steps_offset=0,
    )
    scheduler.set_timesteps(num_steps, device=noise.device)
    z = noise.float()
    for t in scheduler.timesteps:
        tt = torch.full((z.shape[0],), int(t), device=z.device, dtype=torch.long)
        z = scheduler.step(model(z, tt).float(), int(t), z, eta=0.0).prev_sample
    return z


@torch.no_grad()
def ode_sample(
    model: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    schedule: Any,
    scheduler_config: Mapping[str, Any],
    num_steps: int,
) -> Tensor:
    """DDIM (:func:`ddim_sample`) on a VP schedule; on a flow schedule the Euler method
    (``FlowMatchEulerDiscreteScheduler``'s step, which the deterministic consistency
    sampler equals there) at DDIM's "trailing" timesteps ``T - 1 - i T / S``, from
    t = T - 1, ending at ``x_hat``."""
    from ..diffusion import FlowSchedule, sample

    if not isinstance(schedule, FlowSchedule):
        return ddim_sample(model, noise, scheduler_config, num_steps)
    num = schedule.num_train_timesteps
    return sample(
        model, noise, schedule, [num - 1 - i * num // num_steps for i in range(num_steps)]
    )
