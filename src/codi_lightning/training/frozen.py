"""Keep frozen, reloadable parts out of checkpoints; the frozen parts' dtype."""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor, nn

from ..checkpoints import renamed_legacy_keys


class SkipFrozenState:
    """Mixin for LightningModules: ``state_dict`` leaves out the submodules whose keys start
    with ``skipped_prefixes`` (they are rebuilt in ``__init__``, e.g. from ``pretrained``),
    and ``load_state_dict`` refills them from the module itself, so every other key is
    still required when ``strict``; keys of older names (``checkpoints.LEGACY_PREFIXES``)
    load under their current ones. Every checkpoint path (full file, distributed
    checkpoint, ``get_model_state_dict``) goes through these two methods, except FSDP2's
    loading of a distributed checkpoint, which reads by the module's own key names."""

    skipped_prefixes: tuple[str, ...] = ()

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        state = super().state_dict(*args, **kwargs)
        for key in [k for k in state if k.startswith(self.skipped_prefixes)]:
            del state[key]
        return state

    def load_state_dict(
        self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False
    ):
        own = nn.Module.state_dict(self, keep_vars=True)
        merged = dict(renamed_legacy_keys(state_dict))  # checkpoints of older names
        for key, value in own.items():
            if key.startswith(self.skipped_prefixes) and key not in merged:
                merged[key] = value
        return super().load_state_dict(merged, strict=strict, assign=assign)


def frozen_in_bf16(frozen_dtype: str, precision: str | None, on_cuda: bool) -> bool:
    """Whether the frozen teacher, VAE and text encoder are to be bf16 (``model.frozen_dtype``:
    ``bf16``; ``auto``: on CUDA under a bf16 precision), for the trainer's ``precision``
    (None: no trainer). Warns about ``bf16-true`` (the EMA target in bf16) and refuses
    ``frozen_dtype=bf16`` under a precision that is not bf16."""
    precision = precision or ""
    if precision == "bf16-true":
        warnings.warn(
            "precision=bf16-true stores the EMA target in bf16: with ema_decay close to 1 "
            "the update (1 - decay) * (theta - theta^-) underflows. Prefer bf16-mixed.",
            stacklevel=3,
        )
    if frozen_dtype == "bf16" and precision and "bf16" not in precision:
        # bf16 frozen parts compute in bf16 (TeacherIO._controlled autocasts when no
        # precision plugin does): a 32-true run would not be the fp32 run it says it is
        raise ValueError(
            f"model.frozen_dtype=bf16 needs a bf16 precision, but trainer.precision="
            f"{precision}: set trainer.precision=bf16-mixed, or model.frozen_dtype=fp32 "
            "(or auto)"
        )
    return frozen_dtype == "bf16" or (
        frozen_dtype == "auto" and on_cuda and precision.startswith("bf16")
    )
