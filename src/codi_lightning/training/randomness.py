"""Random numbers of the distillation module that make N ranks equal one process: the
global batch's noise drawn on every rank and sliced, generators seeded by the step (a
mixin of :class:`~codi_lightning.training.module.CoDiDistillation`)."""

from __future__ import annotations

import torch
from torch import Tensor

from .run import seeded_generator


class RankRandomness:
    """Noise for this rank's part of the global batch and per-step generators."""

    def _rank_and_world(self) -> tuple[int, int]:
        if self._trainer is None:
            return 0, 1
        return self.global_rank, self.trainer.world_size

    def rank_slice_randn(
        self, shape: torch.Size | tuple, generator: torch.Generator | None
    ) -> Tensor:
        """Standard normal noise for this rank's part of the GLOBAL batch: every rank draws
        the global tensor from the same generator and keeps its slice (cheap next to the
        networks), so DDP/FSDP runs equal a one-process run with the global batch."""
        world = self._rank_and_world()[1]
        full = torch.randn((shape[0] * world, *shape[1:]), generator=generator, device=self.device)
        return self.rank_slice(full, shape[0])

    def rank_slice(self, full: Tensor, per_rank: int) -> Tensor:
        """This rank's rows of a tensor drawn for the global batch."""
        rank = self._rank_and_world()[0]
        return full[rank * per_rank : (rank + 1) * per_rank]

    def step_generator(self, salt: int = 0, micro_batch: int = 0) -> torch.Generator:
        """Generator seeded by (seed, global step, micro-batch, salt): the same draws after
        resume, the same on every rank (each rank keeps its slice of the global draws), and
        fresh draws for each micro-batch of a gradient-accumulation step (``global_step``
        only advances per optimizer step)."""
        micro = f":m{micro_batch}" if micro_batch else ""  # micro-batch 0: the plain key
        return seeded_generator(
            f"{self.hparams.seed}:{self.global_step}{micro}:{salt}", self.device
        )

    def micro_batch_index(self, batch_idx: int) -> int:
        """Position of this batch in its gradient-accumulation step (0 without accumulation),
        counted as Lightning counts it (``batch_idx`` is restored on resume)."""
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        return batch_idx % accumulate
