"""Checks of the module's options that run before the teacher loads, each naming the fix."""

from __future__ import annotations

import re
from collections.abc import Sequence

TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_task_names(tasks: dict[str, str] | None) -> None:
    """``model.predict_tasks``: names usable as folder names, each with a checkpoint."""
    for name, path in (tasks or {}).items():
        if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
            raise ValueError(
                f"model.predict_tasks: task name {name!r} must be letters, digits, '_', '.' "
                "or '-' (it names the output folder)"
            )
        if not isinstance(path, str) or not path:
            raise ValueError(f"model.predict_tasks: task {name!r} needs a checkpoint path")


def check_step_counts(num_grid: int, on_grid: bool, **counts: Sequence[int]) -> None:
    """``model.num_grid`` >= 1 and every sampler step count (``model.val_steps``,
    ``test_steps``, ``predict_steps``) at least 1 and, for a sampler that takes its steps
    from the training grid (``on_grid``), at most ``num_grid``; checked before the
    teacher loads."""
    if not isinstance(num_grid, int) or num_grid < 1:
        raise ValueError(f"model.num_grid={num_grid!r} must be a positive integer (e.g. 50)")
    top = num_grid if on_grid else float("inf")
    for name, steps in counts.items():
        if any(not 1 <= int(s) <= top for s in steps):
            shown = steps[0] if name == "predict_steps" else list(steps)
            where = f"[1, model.num_grid={num_grid}]: the sampler takes its steps from the "
            raise ValueError(
                f"model.{name}={shown} must lie in "
                + (where + "training grid" if on_grid else "[1, inf)")
            )


def check_options(
    *, method: str, lora_rank: int, ema_decay: float, num_grid: int, on_grid: bool,
    val_steps: Sequence[int], test_steps: Sequence[int], predict_steps: int,
    guidance_range: tuple[int, int], val_images: int, max_nonfinite_steps: int,
    grad_clip_norm: float | None, eval_weights: str, predict_tasks: dict[str, str] | None,
) -> None:  # fmt: skip
    """``CoDiDistillation``'s options that need no teacher, checked before it loads."""
    if method not in ("pe-codi", "codi"):
        raise ValueError(f"model.method={method!r}; choose 'pe-codi' or 'codi'")
    if lora_rank < 0 or (lora_rank and method != "pe-codi"):
        raise ValueError(
            f"model.lora_rank={lora_rank}: a LoRA of the frozen network goes with "
            "model.method=pe-codi and a rank >= 1 (full CoDi trains the whole copy)"
        )
    if not 0.0 <= ema_decay <= 1.0:
        raise ValueError(f"model.ema_decay={ema_decay} must lie in [0, 1] (e.g. 0.999)")
    check_step_counts(num_grid, on_grid, val_steps=val_steps,
                      test_steps=test_steps, predict_steps=[predict_steps])  # fmt: skip
    if guidance_range[0] >= guidance_range[1] or val_images < 1:
        raise ValueError(
            f"model.guidance_range={list(guidance_range)} must be [low, high) with low < "
            f"high, and model.val_images={val_images} >= 1"
        )
    if max_nonfinite_steps < 1:
        raise ValueError(f"model.max_nonfinite_steps={max_nonfinite_steps} must be >= 1")
    if grad_clip_norm is not None and grad_clip_norm <= 0:
        raise ValueError(f"model.grad_clip_norm={grad_clip_norm} must be positive (or null)")
    if eval_weights not in ("target", "online"):
        raise ValueError(f"model.eval_weights={eval_weights!r}; choose 'target' or 'online'")
    check_task_names(predict_tasks)
