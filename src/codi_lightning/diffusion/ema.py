"""EMA of the target network theta^- (METHOD.md step 6)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


@torch.no_grad()
def ema_update(target: Iterable[Tensor], online: Iterable[Tensor], decay: float) -> None:
    """``theta^- <- decay * theta^- + (1 - decay) * theta`` in place, over matching lists.

    The target stays in its own dtype (fp32); the online values are cast to it.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
    target = [_local(t) for t in target]
    online = [_local(o).detach().to(t.dtype) for t, o in zip(target, online, strict=True)]
    if target:
        torch._foreach_lerp_(target, online, 1.0 - decay)


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2 parameter); the tensor itself otherwise.

    theta and theta^- are sharded identically, so local shards correspond one to one.
    """
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t
