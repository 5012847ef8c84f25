"""Conversions between the network output and (x_hat, eps_hat) (METHOD.md, "Notation")."""

from __future__ import annotations

from torch import Tensor


def to_x_eps(
    output: Tensor, z: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """Network output ``o`` at ``z_t`` -> ``(x_hat, eps_hat)``.

    - epsilon: ``eps = o``, ``x = (z - sigma o) / alpha``
    - v:       ``x = alpha z - sigma o``, ``eps = alpha o + sigma z``
    - sample:  ``x = o``, ``eps = (z - alpha o) / sigma``
    - flow:    ``x = z - sigma o``, ``eps = z + alpha o`` (velocity ``o = eps - x`` with
      ``alpha = 1 - sigma``)
    """
    if prediction_type == "epsilon":
        return (z - sigma * output) / alpha, output
    if prediction_type == "v_prediction":
        return alpha * z - sigma * output, alpha * output + sigma * z
    if prediction_type == "sample":
        return output, (z - alpha * output) / sigma
    if prediction_type == "flow":
        return z - sigma * output, z + alpha * output
    raise ValueError(f"Unknown prediction_type {prediction_type!r}")


def to_output(x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """Inverse of :func:`to_x_eps`: the output a network of ``prediction_type`` would give
    for clean signal ``x`` and noise ``eps`` (used by oracles and the diffusion loss)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x
    if prediction_type == "sample":
        return x
    if prediction_type == "flow":
        return eps - x
    raise ValueError(f"Unknown prediction_type {prediction_type!r}")
