"""Evaluation streams that give every rank the same number of batches.

Validation/test shards split by rank and worker rarely divide evenly (3 shards over 2
ranks, 1 shard over 2 ranks), and predict folders rarely divide by the world size. A rank
that runs out early would leave the others waiting: under FSDP2 every forward of a sharded
module is a collective, and Lightning reduces logged values at the end of the epoch. So
each rank's stream is padded: before each batch the ranks agree (one all-reduce of a flag)
whether any of them still has data, and a rank that has none yields a padding batch
(``batch["pad"] = True``) that the module runs through the same networks but leaves out of
every metric and output. Real batches carry ``batch["pad"] = False``. Nothing is dropped
and nothing is counted twice; the cost is one tiny all-reduce per batch and, on the ranks
that ran out, forwards whose results are thrown away.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch


def distributed_world() -> int:
    """The number of processes of the default group (1 when not distributed)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _collective_device() -> torch.device:
    """A device the default group's backend can reduce on (CUDA for NCCL)."""
    backend = str(torch.distributed.get_backend()).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective)."""
    if distributed_world() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)


def padding_like(batch: dict[str, Any]) -> dict[str, Any]:
    """A one-sample padding batch shaped like ``batch`` (tensors zeroed, strings empty)."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            out[key] = torch.zeros_like(value[:1])
        elif isinstance(value, list):
            out[key] = [type(value[0])()] if value and isinstance(value[0], str) else []
        elif isinstance(value, dict):
            out[key] = {}
        else:
            out[key] = value
    out["pad"] = True
    return out


class LockstepLoader:
    """Wrap a per-rank loader so that all ranks yield the same number of batches.

    Args:
        loader: this rank's batches (dicts).
        make_padding: builds a padding batch when this rank has not produced any batch
            yet (it must be shaped so the model can run it); after the first real batch,
            padding batches are shaped like the last real one.

    Every ``next`` is a collective: iterate on every rank, the same number of times (as
    Lightning's evaluation loops do when every rank's stream has the same length).
    """

    def __init__(self, loader: Iterable[dict[str, Any]], make_padding: Callable[[], dict]):
        self.loader, self.make_padding = loader, make_padding

    def __iter__(self) -> Iterator[dict[str, Any]]:
        template: dict[str, Any] | None = None
        iterator = iter(self.loader)
        exhausted = False
        while True:
            batch = None if exhausted else next(iterator, None)
            exhausted = batch is None
            if not any_rank(batch is not None):
                return
            if batch is None:
                batch = padding_like(template) if template is not None else self.make_padding()
                batch["pad"] = True
            else:
                batch = {"pad": False, **batch}  # an all-unreadable predict batch is padding
                if not batch["pad"]:
                    template = batch
            yield batch
