"""The optimizer step of the distillation: the global gradient norm (one value on every
rank, FSDP1 and FSDP2 alike), clipping, skipping steps with non-finite gradients (and
stopping after too many in a row), and the EMA target update after each step taken.

A mixin: the class provides ``hparams`` (``grad_clip_norm``, ``max_nonfinite_steps``,
``ema_decay``), ``target``, ``_replicated``, :meth:`trainable_modules` and
:meth:`trainable_parameters`, and the counters ``_skip_update``, ``_nonfinite_run``,
``_nonfinite_total``."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..diffusion import ema_update
from .parallel import global_grad_norm
from .run import logs_this_step


def _is_fsdp1(module: Any) -> bool:
    """``module`` is wrapped by FSDP1 (False on a torch without distributed)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(module, FullyShardedDataParallel)


class NonFiniteTrainingError(RuntimeError):
    """Training met non-finite gradients for ``model.max_nonfinite_steps`` steps in a row
    (each skipped, the weights unchanged); the message names the step and the fix."""


class GuardedUpdates:
    """Gradient norm, clipping, non-finite skips and the EMA update around the step."""

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The total gradient norm (DTensor-aware under FSDP2, so every rank gets the same
        global value): a non-finite one skips the step (:meth:`skip_nonfinite_step`),
        else it is logged and the gradients are clipped to ``grad_clip_norm``."""
        if self._replicated is not None:  # FSDP2: a LoRA kept whole on every rank
            self._replicated.average_grads()
        params = [p for p in self.trainable_parameters() if p.grad is not None]
        self._skip_update = False
        if not params:
            return
        root = getattr(self.trainer.strategy, "model", None)
        if _is_fsdp1(root):  # FSDP1: its own sharded norm
            norm = root.clip_grad_norm_(float("inf"))
        else:
            norm = global_grad_norm([p.grad for p in params])
        # one value on every rank (DDP: reduced gradients; FSDP: the global norm), so the
        # ranks skip together; a non-finite loss on any rank makes it non-finite too
        if not torch.isfinite(norm):
            self.skip_nonfinite_step(params, float(norm))
            return
        self._nonfinite_run = 0
        max_norm = self.hparams.grad_clip_norm
        if max_norm is not None:  # as clip_grads_with_norm_, for sharded and whole alike
            coef = min(max_norm / (float(norm) + 1e-6), 1.0)
            for p in params:
                p.grad.mul_(coef)
        if logs_this_step(self._trainer):
            self.log("train/grad_norm", norm)

    def skip_nonfinite_step(self, params: list[nn.Parameter], norm: float) -> None:
        """Drop this step's gradients (the optimizer then updates nothing: it skips
        parameters without a gradient) and its EMA update, count and log it, and stop the
        run with :class:`NonFiniteTrainingError` after ``max_nonfinite_steps`` in a row."""
        for p in params:
            p.grad = None
        self._skip_update = True
        self._nonfinite_run += 1
        self._nonfinite_total += 1
        self.log("train/nonfinite_steps", float(self._nonfinite_total))
        step = self.global_step
        if self.global_rank == 0:
            warnings.warn(
                f"step {step}: the gradient norm is {norm} (a non-finite loss or gradient): "
                "the step is skipped, weights and EMA target unchanged",
                stacklevel=2,
            )
        limit = self.hparams.max_nonfinite_steps
        if self._nonfinite_run >= limit:
            raise NonFiniteTrainingError(
                f"training stopped at step {step}: the gradient norm was {norm} (a non-finite "
                f"loss or gradient) for {limit} steps in a row; each was skipped, so the "
                "weights, the EMA target and the checkpoints are those of step "
                f"{step - limit}. Lower the learning rate, set model.grad_clip_norm, or check "
                "the data (the data/skipped_* counts); model.max_nonfinite_steps sets the limit"
            )

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if not self._skip_update:  # skipped: non-finite gradients
            self.update_target()  # step 6: theta^- <- gamma theta^- + (1 - gamma) theta

    @torch.no_grad()
    def update_target(self) -> None:
        for key, online in self.trainable_modules().items():
            for module in (online, self.target[key]):
                if hasattr(module, "reshard"):  # FSDP2 roots stay unsharded after forward
                    module.reshard()
            ema_update(self.target[key].parameters(), online.parameters(), self.hparams.ema_decay)
