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
    target = list(target)
    online = [o.detach().to(t.dtype) for t, o in zip(target, online, strict=True)]
    if target:
        torch._foreach_lerp_(target, online, 1.0 - decay)
