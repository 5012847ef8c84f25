"""Sharding and memory options applied in ``configure_model``.

FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning's
``ModelParallelStrategy``: each down/mid/up block of a trainable module (each joint block
of an SD3 transformer or adapter) is one unit, the module itself the root unit. The EMA target is sharded with the same units on the same
mesh, so every rank holds matching shards of theta and theta^- and the EMA update
touches local shards only. Frozen parts (teacher UNet, VAE, text encoder) are never
wrapped: they are replicated (in bf16 on GPU under bf16 precision), so no FSDP unit mixes
frozen and trainable parameters.

A LoRA of the frozen network (``model.lora_rank``) lives inside that replicated network,
so it is replicated too: :class:`ReplicatedGrads` starts it equal on every rank and
averages its gradients over the data-parallel group before each optimizer step (what DDP
does for every parameter; FSDP2's reduce-scatter covers the sharded ones only). Its EMA
copy then moves identically on every rank. The gradient norm adds both kinds
(:func:`global_grad_norm`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models.teachers import FAMILIES

# each family's block lists and single blocks (UNet: down/mid/up; SD3: joint blocks;
# Flux: double- and single-stream blocks), in a fixed order
BLOCK_LISTS = tuple(dict.fromkeys(n for f in FAMILIES.values() for n in f.fsdp_block_lists))
BLOCKS = tuple(dict.fromkeys(n for f in FAMILIES.values() for n in f.fsdp_blocks))


def shard_blocks(module: nn.Module, mesh) -> int:
    """``fully_shard`` each UNet/ControlNet block, then the module; returns the unit count."""
    from torch.distributed.fsdp import fully_shard

    units = 0
    for name in BLOCK_LISTS:
        for block in getattr(module, name, None) or []:
            fully_shard(block, mesh=mesh)
            units += 1
    for name in BLOCKS:
        block = getattr(module, name, None)
        if block is not None:
            fully_shard(block, mesh=mesh)
            units += 1
    fully_shard(module, mesh=mesh)
    return units + 1


def keep_unsharded(module: nn.Module, whole: bool) -> int:
    """``whole=True``: gather every FSDP2 unit under ``module`` (a collective: every rank
    calls it, in the same module order) and keep it gathered after each forward, so
    forwards need no collective and ranks may run different numbers of them (inference
    on inputs of different sizes); ``whole=False``: shard again after each forward and
    free the gathered parameters (local). Returns the number of units (0 without FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return 0
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(not whole, recurse=False)
        if whole:
            unit.unshard()
        else:
            unit.reshard()
    return len(units)


class ReplicatedGrads:
    """Parameters kept whole on every rank of ``group`` beside FSDP2-sharded ones: one
    broadcast from the group's first rank at the start, one all-reduce of their
    gradients (flattened into one buffer) per optimizer step. Every rank calls both, in
    the same order (they are collectives)."""

    def __init__(self, params: list[nn.Parameter], group) -> None:
        self.params, self.group = params, group

    def broadcast(self) -> None:
        import torch.distributed as dist

        src = dist.get_global_rank(self.group, 0)
        with torch.no_grad():
            for p in self.params:
                dist.broadcast(p.data, src=src, group=self.group)

    def average_grads(self) -> None:
        """Mean of each gradient over the group (a missing one counts as zeros)."""
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.group)  # SUM: gloo has no AVG
        flat /= dist.get_world_size(self.group)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(synced)


def global_grad_norm(grads: list) -> torch.Tensor:
    """The 2-norm of all of ``grads`` as a plain tensor, the same on every rank: FSDP2's
    sharded gradients (DTensors) through their global norm, plain ones (whole on every
    rank: DDP's reduced ones, a replicated LoRA's averaged ones) as they are."""
    sharded = [g for g in grads if hasattr(g, "full_tensor")]
    plain = [g for g in grads if not hasattr(g, "full_tensor")]
    parts = []
    if sharded:
        parts.append(torch.nn.utils.get_total_norm(sharded).full_tensor())
    if plain:
        parts.append(torch.nn.utils.get_total_norm(plain))
    return parts[0] if len(parts) == 1 else torch.linalg.vector_norm(torch.stack(parts))


def data_parallel_mesh(mesh):
    """The data-parallel sub-mesh of Lightning's ``ModelParallelStrategy`` mesh."""
    if mesh is None:
        return None
    names = mesh.mesh_dim_names or ()
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def enable_memory_savers(
    modules: list[nn.Module], checkpointing: bool, channels_last: bool
) -> None:
    for m in modules:
        if checkpointing and hasattr(m, "enable_gradient_checkpointing"):
            m.enable_gradient_checkpointing()
        if channels_last:
            m.to(memory_format=torch.channels_last)


def diffusers_block_classes() -> set[type[nn.Module]]:
    """FSDP1 auto-wrap units: every family's block classes and its network and adapter
    models (``TeacherFamily.fsdp_block_classes``), so the online adapter and its EMA
    copy are separate units with the same layout and frozen models never share a unit
    with trainable ones."""
    return set().union(*(family.fsdp_block_classes() for family in FAMILIES.values()))


try:  # FSDP1 policy class for YAML: `auto_wrap_policy: {class_path: ...DiffusersBlockWrapPolicy}`
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    class DiffusersBlockWrapPolicy(ModuleWrapPolicy):
        """``ModuleWrapPolicy`` over :func:`diffusers_block_classes`."""

        def __init__(self) -> None:
            super().__init__(diffusers_block_classes())

except ImportError:  # pragma: no cover - torch without distributed
    pass


try:  # the FSDP2 preset's strategy (configs/trainer/fsdp.yaml)
    from lightning.pytorch.strategies import ModelParallelStrategy as _ModelParallelStrategy

    class CheckedModelParallelStrategy(_ModelParallelStrategy):
        """Lightning's ``ModelParallelStrategy`` whose sharded checkpoints record the size
        and CRC-32 of every file (``checksums.json``, written by rank 0 once every rank
        has written its shards), which ``codi_lightning.checkpoints.check_checkpoint``
        verifies before anything loads the folder: a damaged shard is named, not trained
        on (distributed checkpoints carry no checksum of their own). Checkpoints of the
        networks' older key names are refused in one line (:func:`check_current_keys`)."""

        def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
            from ..checkpoints import check_current_keys

            check_current_keys(self.broadcast(checkpoint_path))  # older names: one line
            return super().load_checkpoint(checkpoint_path, weights_only)

        def save_checkpoint(
            self, checkpoint: dict, filepath: Any, storage_options: Any | None = None
        ) -> None:
            from pathlib import Path

            from ..checkpoints import write_checksums

            super().save_checkpoint(checkpoint, filepath, storage_options)
            if not self._save_distributed_checkpoint:
                return
            path = Path(self.broadcast(filepath))
            self.barrier()  # every rank's shards are on disk
            if self.global_rank == 0:
                write_checksums(path)
            self.barrier()

except ImportError:  # pragma: no cover - lightning without distributed
    pass
