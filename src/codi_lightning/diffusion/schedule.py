"""Noise schedules: the discrete VP diffusion of SD 1.x/2.x/XL (METHOD.md, "Notation") and
rectified flow (SD3, Flux; METHOD.md, "Other teacher families").

Both give ``(alpha_t, sigma_t)`` at integer training timesteps ``t`` in [0, T) with
``z_t = alpha_t x + sigma_t eps`` (flow: ``alpha = 1 - sigma``), a prediction type for
:mod:`.parameterization`, the consistency function's boundary condition and the timestep
the network is fed, so the loss and the samplers serve both families unchanged.

The tables are plain tensors (never registered buffers: Lightning casts buffers to bf16
under bf16 precision, which would corrupt ``alpha_t`` near ``t = 0``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .boundary import apply_boundary

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FLOW = "flow"  # velocity v = eps - x of rectified flow


def betas_from_config(config: Mapping[str, Any]) -> Tensor:
    """``betas`` (fp64, shape ``[T]``) from a diffusers scheduler config dict.

    Supports the three schedules Stable Diffusion teachers use: ``linear``,
    ``scaled_linear`` (SD 1.x/2.x) and ``squaredcos_cap_v2`` (Glide cosine).
    """
    if config.get("trained_betas") is not None:
        return torch.as_tensor(config["trained_betas"], dtype=torch.float64)
    num = int(config.get("num_train_timesteps", 1000))
    start = float(config.get("beta_start", 0.0001))
    end = float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if kind == "linear":
        return torch.linspace(start, end, num, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, num, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":

        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - abar((i + 1) / num) / abar(i / num), 0.999) for i in range(num)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(
        f"Unsupported beta_schedule {kind!r}; use one of linear, scaled_linear, squaredcos_cap_v2 "
        "or give trained_betas in the scheduler config."
    )


@dataclass(frozen=True)
class NoiseSchedule:
    """``alpha_t = sqrt(abar_t)`` and ``sigma_t = sqrt(1 - abar_t)`` for t in [0, T).

    Attributes:
        alphas_cumprod: ``abar_t``, fp64, shape ``[T]``.
        prediction_type: what the network outputs: ``epsilon``, ``v_prediction`` or ``sample``.
    """

    alphas_cumprod: Tensor
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES} "
                "(SD 1.x uses 'epsilon', SD 2.x 'v_prediction')."
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """Build from a diffusers scheduler config (e.g. ``scheduler/scheduler_config.json``)."""
        betas = betas_from_config(config)
        return cls(
            alphas_cumprod=torch.cumprod(1.0 - betas, dim=0),
            prediction_type=config.get("prediction_type", "epsilon"),
        )

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of discrete training timesteps."""
        return self.alphas_cumprod.shape[0]

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha_t, sigma_t)`` gathered at integer timesteps ``t`` ([B] or scalar).

        Returned in ``like``'s dtype and device, shaped ``[B, 1, 1, ...]`` to broadcast
        against ``like`` ([B, C, H, W]). The gather happens in fp64 first.
        """
        abar = _on_device(self, self.alphas_cumprod, t.device)[t.long()]
        return _broadcast(abar.sqrt(), like), _broadcast((1.0 - abar).sqrt(), like)

    def boundary(self, z: Tensor, x_hat: Tensor, t: Tensor) -> Tensor:
        """The consistency function ``f(z_t, t)``: LCM's ``c_skip z + c_out x_hat``."""
        return apply_boundary(z, x_hat, t)

    def model_timesteps(self, t: Tensor) -> Tensor:
        """What the network is fed for training timestep ``t``: ``t`` itself."""
        return t


def _on_device(schedule: Any, table: Tensor, device: torch.device) -> Tensor:
    """``table`` on ``device``, copied there once per schedule (it is read every step)."""
    cache = schedule.__dict__.setdefault("_device_tables", {})
    if device not in cache:
        cache[device] = table.to(device)
    return cache[device]


def _broadcast(value: Tensor, like: Tensor) -> Tensor:
    """Gathered fp64 values ([B] or scalar) in ``like``'s dtype and device, shaped
    ``[B, 1, 1, ...]`` to broadcast against ``like``."""
    shape = (1,) * like.ndim if value.ndim == 0 else (-1,) + (1,) * (like.ndim - 1)
    return value.to(like.dtype).reshape(shape).to(like.device)


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow: ``z_t = (1 - sigma_t) x + sigma_t eps`` for t in [0, T), the network
    predicting ``v = eps - x`` and fed ``1000 sigma_t`` (diffusers'
    ``FlowMatchEulerDiscreteScheduler``: ``sigma_t = shift u / (1 + (shift - 1) u)`` with
    ``u = (t + 1) / T``; SD3 shift 3.0).

    Attributes:
        sigmas: ``sigma_t``, fp64, shape ``[T]``, increasing in t.
        shift: the sigma shift the table was made with (a record).
    """

    sigmas: Tensor
    shift: float = 1.0
    prediction_type: str = FLOW

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], image_seq_len: int | None = None
    ) -> FlowSchedule:
        """From a ``FlowMatchEulerDiscreteScheduler`` config (``shift``,
        ``num_train_timesteps``). With ``use_dynamic_shifting`` (Flux) the shift depends
        on the image size: ``image_seq_len`` (the number of image tokens of the run's
        resolution) gives ``mu`` (:func:`dynamic_shift`), and the table is the one the
        stock pipelines sample with at that size (``set_timesteps(mu=...)``)."""
        num = int(config.get("num_train_timesteps", 1000))
        if config.get("use_dynamic_shifting"):
            if image_seq_len is None:
                raise ValueError(
                    "this teacher's scheduler shifts sigmas by image size "
                    "(use_dynamic_shifting): the schedule needs the training resolution "
                    "(model.shift_resolution, or data.resolution through the CLI)"
                )
            shift = dynamic_shift(config, image_seq_len)
        else:
            shift = float(config.get("shift", 1.0))
        u = torch.arange(1, num + 1, dtype=torch.float64) / num
        return cls(shift * u / (1 + (shift - 1) * u), shift)

    @property
    def num_train_timesteps(self) -> int:
        return self.sigmas.shape[0]

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(1 - sigma_t, sigma_t)`` at integer timesteps ``t``, shaped as
        :meth:`NoiseSchedule.alpha_sigma`."""
        sigma = _broadcast(_on_device(self, self.sigmas, t.device)[t.long()], like)
        return 1 - sigma, sigma

    def boundary(self, z: Tensor, x_hat: Tensor, t: Tensor) -> Tensor:
        """``f = x_hat = z - sigma v_hat``: it already equals ``z`` at ``sigma = 0``, so no
        ``c_skip`` / ``c_out`` (as ``FlowMatchLCMScheduler``)."""
        return x_hat

    def unshifted(self, timesteps: Sequence[int]) -> list[float]:
        """``u_t = (t + 1) / T`` for integer timesteps: the values diffusers' flow
        schedulers shift into ``sigma_t``. ``FlowMatchLCMScheduler.set_timesteps(sigmas=
        schedule.unshifted(ts))`` (a pipeline's ``sigmas=`` argument) runs our sampler's
        steps ``ts`` (its default spacing does not lie on the distillation grid)."""
        num = self.num_train_timesteps
        return [(int(t) + 1) / num for t in timesteps]

    def model_timesteps(self, t: Tensor) -> Tensor:
        """``1000 sigma_t`` (float), the timestep flow transformers are trained on."""
        return _on_device(self, self.sigmas, t.device)[t.long()].float() * 1000


def dynamic_shift(config: Mapping[str, Any], image_seq_len: int) -> float:
    """The sigma shift of a ``use_dynamic_shifting`` scheduler for ``image_seq_len`` image
    tokens: ``mu`` interpolated linearly between ``base_shift`` at ``base_image_seq_len``
    and ``max_shift`` at ``max_image_seq_len`` (Flux.1: 0.5 at 256, 1.15 at 4096), then
    ``exp(mu)`` (``time_shift_type: exponential``, the default) or ``mu`` (``linear``):
    ``sigma = s u / (1 + (s - 1) u)`` either way."""
    base_len = float(config.get("base_image_seq_len", 256))
    max_len = float(config.get("max_image_seq_len", 4096))
    base, top = float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15))
    mu = base + (top - base) * (image_seq_len - base_len) / (max_len - base_len)
    kind = config.get("time_shift_type", "exponential")
    if kind not in ("exponential", "linear"):
        raise ValueError(f"time_shift_type={kind!r}: expected 'exponential' or 'linear'")
    return math.exp(mu) if kind == "exponential" else mu


def flow_match_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``FlowMatchEulerDiscreteScheduler`` config of a flow-matching scheduler config:
    a ``FlowMatch*`` config itself, or the flow mode of the multistep solvers
    (``prediction_type: flow_prediction`` with ``use_flow_sigmas``, as SANA ships
    ``DPMSolverMultistepScheduler``), whose ``flow_shift`` is the same sigma shift
    ``shift u / (1 + (shift - 1) u)``; None for a VP (DDPM, DDIM, ...) config."""
    if str(config.get("_class_name", "")).startswith("FlowMatch"):
        return dict(config)
    if config.get("prediction_type") == "flow_prediction" or config.get("use_flow_sigmas"):
        return {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": int(config.get("num_train_timesteps", 1000)),
            "shift": float(config.get("flow_shift") or 1.0),
        }
    return None


def vp_view_of_flow(alphas_cumprod: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Where a VP model sees the flow state ``z = (1 - sigma) x + sigma eps``.

    A VP state ``a x + b eps`` is the flow state at ``sigma = b / (a + b)`` scaled by
    ``a + b``, so a VP model denoises a flow state at the (fractional) timestep ``t`` where
    ``b_t / (a_t + b_t) = sigma``: found by linear interpolation of that ratio over the
    integer timesteps, with ``abar_t`` interpolated there too.

    Args:
        alphas_cumprod: the VP schedule's ``abar_t``, shape ``[T]``.
        sigma: flow noise levels, any shape; at most the VP schedule's last ratio.

    Returns:
        ``(t, a, b)`` shaped as ``sigma``: the fractional timestep and the VP scales, so that
        ``(a + b) z`` is the VP model's input at ``t``.
    """
    abar = alphas_cumprod.to(torch.float64)
    ratio = (1 - abar).sqrt() / (abar.sqrt() + (1 - abar).sqrt())  # increasing in t
    s = sigma.to(torch.float64).reshape(-1)
    if bool((s > ratio[-1] + 1e-6).any()) or bool((s < ratio[0] - 1e-6).any()):
        raise ValueError(
            f"flow sigma outside [{float(ratio[0]):.4f}, {float(ratio[-1]):.4f}], the noise "
            "levels this VP schedule reaches"
        )
    s = s.clamp(ratio[0], ratio[-1])  # float32 rounding at the ends
    hi = torch.searchsorted(ratio, s).clamp(1, len(ratio) - 1)
    lo = hi - 1
    frac = (s - ratio[lo]) / (ratio[hi] - ratio[lo])
    t = lo + frac
    abar_t = abar[lo] + frac * (abar[hi] - abar[lo])
    shape = sigma.shape
    return (
        t.reshape(shape).to(sigma.dtype),
        abar_t.sqrt().reshape(shape).to(sigma.dtype),
        (1 - abar_t).sqrt().reshape(shape).to(sigma.dtype),
    )


def schedule_from_config(
    config: Mapping[str, Any], image_seq_len: int | None = None
) -> NoiseSchedule | FlowSchedule:
    """The schedule of a diffusers scheduler config: flow-matching configs
    (:func:`flow_match_config`) give a :class:`FlowSchedule` (``image_seq_len``: for
    resolution-dependent shifting), every other (DDPM, DDIM, Euler, ...) a
    :class:`NoiseSchedule`."""
    flow = flow_match_config(config)
    if flow is not None:
        return FlowSchedule.from_config(flow, image_seq_len)
    return NoiseSchedule.from_config(config)
