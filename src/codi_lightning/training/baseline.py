"""The two-stage baseline: a ControlNet trained with the ordinary diffusion loss on the
condition (teacher frozen), sampled with DDIM (flow teachers: Euler). What CoDi is
compared against."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..diffusion import diffusion_loss
from .ddim import ode_sample
from .module import CoDiDistillation


class ControlNetBaseline(CoDiDistillation):
    """Same parts, data, EMA, validation, test and predict as :class:`CoDiDistillation`,
    but the loss is ``|| F_theta(z_t, t, y, c) - target ||^2`` with t uniform in [0, T)
    and sampling is DDIM (``test_steps`` e.g. [4, 8, 50]); on a flow schedule (SD3) the
    target is the velocity and sampling is the Euler method. The ``loss`` options and
    ``num_grid`` are unused."""

    steps_on_grid = False  # DDIM / Euler at any step count

    def compute_loss(self, batch: dict[str, Any], gen: torch.Generator) -> tuple[Tensor, dict]:
        x = self.batch_latents(batch, gen)
        cond, text = self.adapter_condition(batch["cond"]), self.batch_conditioning(batch)
        noise = self.rank_slice_randn(x.shape, gen)
        b, world = x.shape[0], self._rank_and_world()[1]
        t = torch.randint(
            0, self.schedule.num_train_timesteps, (b * world,), generator=gen, device=gen.device
        )
        t = self.rank_slice(t, b).to(x.device)  # drawn for the global batch, as the noise
        loss = diffusion_loss(self.denoiser("online", text, cond), x, noise, t, self.schedule)
        return loss, {"loss": loss.detach(), "diffusion": loss.detach()}

    def run_sampler(self, model, noise: Tensor, num_steps: int, **kwargs: Any) -> Tensor:
        """DDIM (eta = 0) in ``num_steps`` steps; the consistency-sampler options
        (``stochastic``, guidance) do not apply. A flow schedule is sampled by the Euler
        method (``FlowMatchEulerDiscreteScheduler``'s step, which our deterministic sampler
        equals on a flow schedule) at DDIM's "trailing" timesteps, from t = T - 1
        (``ode_sample``)."""
        return ode_sample(model, noise, self.schedule, self.scheduler_config, num_steps)
