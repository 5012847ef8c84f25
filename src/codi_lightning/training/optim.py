"""Optimizer and LR-scheduler wiring shared by the LightningModules."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def optimizers_for(
    params: Iterable[torch.nn.Parameter],
    optimizer_factory: Callable[..., torch.optim.Optimizer],
    lr_scheduler_factory: Callable[..., Any] | None,
) -> Any:
    """``configure_optimizers`` output: the optimizer, plus its scheduler stepped every
    optimizer step when one is configured."""
    optimizer = optimizer_factory(params)
    if lr_scheduler_factory is None:
        return optimizer
    scheduler = lr_scheduler_factory(optimizer)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
