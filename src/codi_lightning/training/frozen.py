"""Keep frozen, reloadable parts out of checkpoints."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..checkpoints import renamed_legacy_keys


class SkipFrozenState:
    """Mixin for LightningModules: ``state_dict`` leaves out the submodules whose keys start
    with ``skipped_prefixes`` (they are rebuilt in ``__init__``, e.g. from ``pretrained``),
    and ``load_state_dict`` refills them from the module itself, so every other key is
    still required when ``strict``; keys of older names
    (``checkpoints.LEGACY_PREFIXES``) load under their current ones. Every checkpoint path (full file, distributed
    checkpoint, ``get_model_state_dict``) goes through these two methods."""

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
