"""The conditional consistency loss of CoDi (METHOD.md, "One training step").

The networks come in as arguments: each is a callable ``(z, t) -> o`` returning the raw
network output (epsilon, v or sample, per ``schedule.prediction_type``) with the
condition and text already bound. Randomness (``noise``, ``t``, ``s``) is passed in, so
the function is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .parameterization import to_output, to_x_eps
from .schedule import NoiseSchedule
from .solvers import ode_step

Denoiser = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class CoDiLossConfig:
    """Every switch of the loss (see the table in README.md).

    Attributes:
        solver: model that takes the ODE step from t to s: ``self`` (online theta, no
            grad; the paper), ``target`` (EMA theta^-) or ``teacher`` (the pretrained UNet
            without adapter; the released code's ``--onestepode uncontrol``).
        ode_noise: noise used in the ODE step: ``true`` (the sampled eps: the paper's
            "noise replacement") or ``predicted`` (eps_hat of the solver: DDIM, the paper's
            appendix algorithm).
        consistency_space: ``epsilon`` compares eps_hat_t with eps_hat_s^- (the paper);
            ``x`` compares f_theta(z_t, t) with f_theta^-(z_hat_s, s) (the released code).
        guidance_weight: lambda_x, weight of the conditional guidance d(x, f_theta(z_t, t)).
        distance: ``l2`` (mean squared error in latent space) or ``huber``
            (``sqrt(d^2 + c^2) - c`` elementwise, as in LCM).
        huber_c: the Huber constant c.
    """

    solver: Literal["self", "target", "teacher"] = "self"
    ode_noise: Literal["true", "predicted"] = "true"
    consistency_space: Literal["epsilon", "x"] = "epsilon"
    guidance_weight: float = 1.0
    distance: Literal["l2", "huber"] = "l2"
    huber_c: float = 0.001

    def __post_init__(self) -> None:
        choices = {
            "solver": ("self", "target", "teacher"),
            "ode_noise": ("true", "predicted"),
            "consistency_space": ("epsilon", "x"),
            "distance": ("l2", "huber"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"loss.{name}={getattr(self, name)!r}; choose one of {allowed}")
        if self.guidance_weight < 0:
            raise ValueError(f"loss.guidance_weight must be >= 0, got {self.guidance_weight}")


def distance(a: Tensor, b: Tensor, kind: str = "l2", huber_c: float = 0.001) -> Tensor:
    """Per-sample distance ``d(a, b)``, shape ``[B]`` (mean over the other dims)."""
    diff = a.float() - b.float()
    if kind == "l2":
        per_elem = diff.square()
    elif kind == "huber":
        per_elem = (diff.square() + huber_c**2).sqrt() - huber_c
    else:
        raise ValueError(f"Unknown distance {kind!r}")
    return per_elem.flatten(1).mean(dim=1)


def codi_loss(
    online: Denoiser,
    target: Denoiser,
    solver: Denoiser | None,
    x: Tensor,
    noise: Tensor,
    t: Tensor,
    s: Tensor,
    schedule: NoiseSchedule,
    config: CoDiLossConfig = CoDiLossConfig(),
) -> tuple[Tensor, dict[str, Tensor]]:
    """CoDi loss ``d(eps_hat_t, eps_hat_s^-) + lambda_x d(x, x_hat_t)`` (METHOD.md steps 1-5).

    Args:
        online: F_theta, called with grad.
        target: F_theta^- (EMA); called under ``no_grad``.
        solver: model for the ODE step, called under ``no_grad``; ``None`` reuses the
            online output detached (exact for ``solver="self"`` when the online
            prediction is not guidance-mixed, and saves a forward pass).
        x: clean latents [B, C, H, W] (fp32).
        noise: eps ~ N(0, I), same shape.
        t, s: integer timesteps [B] with ``s = max(t - k, 0)``.
        schedule: the teacher's noise schedule.
        config: the loss switches.

    Returns:
        ``(loss, terms)``: the scalar loss and a dict of detached scalars
        (``consistency``, ``guidance``, ``loss``).
    """
    pt = schedule.prediction_type
    x = x.float()
    noise = noise.float()
    alpha_t, sigma_t = schedule.alpha_sigma(t, x)
    alpha_s, sigma_s = schedule.alpha_sigma(s, x)

    z_t = alpha_t * x + sigma_t * noise  # (1) forward diffusion
    x_t, eps_t = to_x_eps(online(z_t, t).float(), z_t, alpha_t, sigma_t, pt)  # (2) online
    f_t = schedule.boundary(z_t, x_t, t)

    with torch.no_grad():
        # (3) one ODE step t -> s with the solver model ("PF-ODE of the adapted model")
        if solver is None:
            x_sol, eps_sol = x_t.detach(), eps_t.detach()
        else:
            x_sol, eps_sol = to_x_eps(solver(z_t, t).float(), z_t, alpha_t, sigma_t, pt)
        z_s = ode_step(x_sol, noise if config.ode_noise == "true" else eps_sol, alpha_s, sigma_s)
        # (4) target prediction at s with theta^-, boundary condition applied at s
        x_s, eps_s = to_x_eps(target(z_s, s).float(), z_s, alpha_s, sigma_s, pt)
        f_s = schedule.boundary(z_s, x_s, s)

    # (5) consistency in noise space (paper) or x space (released code) + guidance term
    if config.consistency_space == "epsilon":
        consistency = distance(eps_t, eps_s, config.distance, config.huber_c)
    else:
        consistency = distance(f_t, f_s, config.distance, config.huber_c)
    guidance = distance(f_t, x, config.distance, config.huber_c)
    loss = (consistency + config.guidance_weight * guidance).mean()
    terms = {
        "consistency": consistency.mean().detach(),
        "guidance": guidance.mean().detach(),
        "loss": loss.detach(),
    }
    return loss, terms


def diffusion_loss(
    model: Denoiser, x: Tensor, noise: Tensor, t: Tensor, schedule: NoiseSchedule
) -> Tensor:
    """The ordinary diffusion loss ``|| F(z_t, t) - target ||^2`` with ``z_t = alpha_t x +
    sigma_t eps`` and the target of the schedule's prediction type (eps, v or x); used to
    train a teacher and the two-stage baseline."""
    x, noise = x.float(), noise.float()
    alpha, sigma = schedule.alpha_sigma(t, x)
    target = to_output(x, noise, alpha, sigma, schedule.prediction_type)
    return F.mse_loss(model(alpha * x + sigma * noise, t).float(), target)
