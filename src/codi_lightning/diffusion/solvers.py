"""One-step move along the probability-flow ODE (METHOD.md, step 3)."""

from __future__ import annotations

from torch import Tensor


def ode_step(x_hat: Tensor, eps: Tensor, alpha_s: Tensor, sigma_s: Tensor) -> Tensor:
    """``z_s = alpha_s x_hat + sigma_s eps``.

    With ``eps = eps_hat`` this is the deterministic DDIM step (eta = 0); with the true
    noise it is the paper's "noise replacement" variant (METHOD.md step 3).
    """
    return alpha_s * x_hat + sigma_s * eps
