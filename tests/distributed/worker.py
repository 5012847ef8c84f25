"""Worker for the multi-process tests (run with torch.distributed.run, or alone for 1 process).

Modes:
  train: fit the tiny model on a fixed global batch split across ranks; write the
         per-step losses (mean over ranks) and the full EMA target to --out, and (SDXL)
         the time_ids each rank's teacher UNet was called with.
  data:  read the validation stream and a few training batches of a ShardDataModule;
         write the sample keys each rank saw to --out.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from codi_lightning.training import CoDiDistillation


def global_batch(n: int) -> list[dict]:
    """n fixed samples, each with its own recorded original size and crop (SDXL's
    time_ids; other families ignore them)."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    captions = ["a red circle", "", "a blue square", "stripes"] * n
    return [
        {"image": image[i], "cond": (image[i] + 1) / 2, "caption": captions[i],
         "original_size": torch.tensor([64 + 8 * i, 48 - 4 * i]),
         "crop_top_left": torch.tensor([i, 2 * i])}
        for i in range(n)
    ]  # fmt: skip


class RankSlice(L.LightningDataModule):
    """Rank r trains on rows [r b, (r + 1) b) of one fixed global batch, every step."""

    def __init__(self, global_size: int) -> None:
        super().__init__()
        self.global_size = global_size

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        b = self.global_size // world
        rows = global_batch(self.global_size)[rank * b : (rank + 1) * b]
        return DataLoader(rows, batch_size=b, shuffle=False)


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")
        self.losses[trainer.global_step] = float(loss)


def full_target(module: CoDiDistillation) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in module.target.named_parameters():
        out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
    return out


def train(args: argparse.Namespace) -> None:
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    world = int(os.environ.get("WORLD_SIZE", "1"))
    strategy = {
        "single": "auto",
        "ddp": DDPStrategy(process_group_backend="gloo"),
        "fsdp": ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
    }[args.strategy]
    module = CoDiDistillation(
        args.teacher, method=args.method, num_grid=10, ema_decay=0.9, grad_clip_norm=1.0,
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), lora_rank=args.lora_rank,
    )  # fmt: skip
    time_ids: list[list[list[float]]] = []  # per teacher UNet call: [b, 6]

    def record_time_ids(unet, args, kwargs):
        if kwargs.get("added_cond_kwargs"):  # SDXL
            time_ids.append(kwargs["added_cond_kwargs"]["time_ids"].tolist())

    module.network.register_forward_pre_hook(record_time_ids, with_kwargs=True)
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=world, num_nodes=1, strategy=strategy, max_steps=args.max_steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[recorder], use_distributed_sampler=False,
        precision=args.precision,
    )  # fmt: skip
    trainer.fit(module, datamodule=RankSlice(args.global_batch), ckpt_path=args.resume)
    if args.save:
        trainer.save_checkpoint(args.save)
    target = full_target(module)
    if time_ids:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"time_ids_rank{trainer.global_rank}.json").write_text(json.dumps(time_ids))
    if trainer.global_rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "losses.json").write_text(json.dumps(recorder.losses))
        torch.save({"target": target, "global_step": trainer.global_step}, out / "state.pt")
    # leave the process group before exit: gloo's threads at interpreter exit otherwise
    # abort the process now and then ("terminate called without an active exception")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def data(args: argparse.Namespace) -> None:
    from codi_lightning.data import ShardDataModule

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    dm = ShardDataModule(args.train_shards, args.val_shards, resolution=32, batch_size=2,
                         num_workers=args.workers, condition="sr")  # fmt: skip
    batches = list(dm.val_dataloader())
    val = [k for batch in batches if not batch["pad"] for k in batch["key"]]
    pads = sum(batch["pad"] for batch in batches)
    it = iter(dm.train_dataloader())
    train_keys = [k for _ in range(3) for k in next(it)["key"]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"val": val, "train": train_keys, "batches": len(batches), "pads": pads}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    torch.distributed.destroy_process_group()


def metrics(args: argparse.Namespace) -> None:
    """EvalSuite over 10 fixed image pairs; rank r updates with the rows it is given
    (``--rows`` as ``r0rows/r1rows``, e.g. ``0-6/6-10`` or ``0-10/``), in batches of 2."""
    from codi_lightning.metrics import EvalSuite, MetricsConfig

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    g = torch.Generator().manual_seed(0)
    preds, target = torch.rand(2, 10, 3, 32, 32, generator=g)
    part = args.rows.split("/")[rank]
    lo, hi = (int(v) for v in part.split("-")) if part else (0, 0)
    config = MetricsConfig(feature="random_conv", lpips=False, kid_subset_size=1000, swd=True,
                           input_consistency_factor=4, save_features=True)  # fmt: skip
    suite = EvalSuite(config, [1])
    for i in range(lo, hi, 2):
        suite.update(1, preds[i : min(i + 2, hi)], target[i : min(i + 2, hi)])
    results = suite.compute()[1]
    features = suite.features()[1]["fid"]  # a collective too: every rank
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    torch.save(features, out / f"features{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "data", "metrics"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--teacher")
    parser.add_argument("--strategy", default="single", choices=["single", "ddp", "fsdp"])
    parser.add_argument("--method", default="pe-codi")
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--resume")
    parser.add_argument("--save")
    parser.add_argument("--train-shards")
    parser.add_argument("--val-shards")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rows", default="0-10")
    args = parser.parse_args()
    {"train": train, "data": data, "metrics": metrics}[args.mode](args)


if __name__ == "__main__":
    main()
