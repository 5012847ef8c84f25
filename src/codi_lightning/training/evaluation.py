"""Validation, test and predict of the distillation module: sample grids, the metrics'
files, predict's outputs and its several tasks on one backbone (a mixin of
:class:`~codi_lightning.training.module.CoDiDistillation`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoints import read_checkpoint
from ..metrics import EvalSuite, write_results
from ..models import ImageSizes
from .parallel import keep_unsharded
from .run import seeded_generator
from .visualize import save_grid


def sample_keys(batch: dict[str, Any], field: str, batch_idx: int) -> list[str]:
    """Per-sample keys that seed the evaluation noise: the shard key (test) or the input's
    name (predict); ``batch_idx:i`` for batches that carry neither."""
    keys = batch.get(field)
    return list(keys) if keys else [f"{batch_idx}:{i}" for i in range(len(batch["cond"]))]


class EvaluationSteps:
    """Lightning's validation, test and predict hooks of the distillation module."""

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Validation loss terms and, for the first batch, the sample grid.

        Every rank runs the same networks on every batch, padding batches included (under
        FSDP2 each forward is a collective; see ``data.lockstep``); padding batches count
        with weight 0 in the logged means."""
        gen = torch.Generator(device=self.device).manual_seed(self.hparams.seed + batch_idx)
        _, terms = self.compute_loss(batch, gen)
        weight = 0 if batch.get("pad") else batch["image"].shape[0]
        for k, v in terms.items():
            self.log(f"val/{k}", v, sync_dist=True, batch_size=weight)
        if batch_idx == 0:
            self.log_sample_grid(batch)

    @torch.no_grad()
    def log_sample_grid(self, batch: dict[str, Any]) -> Path | None:
        """Rows of condition | 1 | 2 | 4 steps | target; to TensorBoard and a PNG.

        Every rank samples its own first batch (the same number of forwards everywhere,
        as FSDP2 needs); rank 0 writes its grid."""
        if self.trainer.sanity_checking:
            return None
        n = min(self.hparams.val_images, batch["image"].shape[0])
        cond, captions = batch["cond"][:n], batch["caption"][:n]
        sizes = ImageSizes.from_batch(batch)[:n]
        columns = [cond]
        for steps in self.hparams.val_steps:
            gen = torch.Generator(device=self.device).manual_seed(self.hparams.seed)
            columns.append(
                self.sample_images(
                    cond,
                    captions,
                    steps,
                    generator=gen,
                    guidance_scale=self.hparams.val_guidance_scale,
                    sizes=sizes,
                )  # fmt: skip
            )
        columns.append((batch["image"][:n].float() + 1) / 2)
        if self.global_rank != 0 or batch.get("pad"):
            return None
        step = self.global_step or self._checkpoint_step  # validate/test: the checkpoint's step
        path = self.run_dir / "samples" / f"step_{step:07d}.png"
        grid = save_grid(columns, path)
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image("val/samples", grid, step)
        return path

    # ------------------------------------------------------------------ test and predict
    def _eval_samples(self, batch: dict[str, Any], steps: int, keys: Sequence[str]) -> Tensor:
        """Samples whose noise is seeded by (seed, sample key): the same image for a sample
        whichever rank, batch or batch size it comes in."""
        hp = self.hparams
        gen = [seeded_generator(f"{hp.seed}:{key}", self.device) for key in keys]
        return self.sample_images(
            batch["cond"], batch["caption"], steps, use_target=hp.eval_weights == "target",
            stochastic=hp.eval_stochastic, guidance_scale=hp.eval_guidance_scale, generator=gen,
            sizes=ImageSizes.from_batch(batch),
        )  # fmt: skip

    def on_test_start(self) -> None:
        if self.eval_suite is None:
            self.eval_suite = EvalSuite(self.metrics_config, self.hparams.test_steps).to(
                self.device
            )
        self.eval_suite.reset()
        self._test_grid = {}

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Sample at every step count (padding batches too, for FSDP2) and update the
        metrics with the real samples; rank 0 keeps its first real batch's samples (at
        most ``val_images`` rows) for ``test_samples.png``."""
        target = (batch["image"].float() + 1) / 2
        n = min(self.hparams.val_images, target.shape[0])
        keep = self.global_rank == 0 and not batch.get("pad") and not self._test_grid and n > 0
        for steps in self.hparams.test_steps:  # the same noise for every step count
            preds = self._eval_samples(batch, steps, sample_keys(batch, "key", batch_idx))
            if not batch.get("pad"):
                self.eval_suite.update(steps, preds, target, batch["caption"])
            if keep:
                self._test_grid[str(steps)] = preds[:n].detach().float().cpu()
        if keep:
            self._test_grid["cond"] = batch["cond"][:n].detach().float().cpu()
            self._test_grid["truth"] = target[:n].detach().cpu()

    def on_test_epoch_end(self) -> None:
        results = self.eval_suite.compute()  # reduced across ranks; every rank computes
        features = self.eval_suite.features() if self.metrics_config.save_features else None
        for steps, row in results.items():
            for name, value in row.items():
                self.log(f"test/{name}@{steps}", float(value), rank_zero_only=True)
        self.test_results = results
        if self.global_rank == 0:  # files and images only: no collective in here
            folder = self.run_dir
            step = self.global_step or self._checkpoint_step
            meta = {
                "weights": self.hparams.eval_weights,
                "step": step,
                "guidance": self.hparams.eval_guidance_scale,
                "sampler": "stochastic" if self.hparams.eval_stochastic else "deterministic",
            }
            grid = self.save_test_grid(folder / "test_samples.png", step)
            image = grid.name if grid is not None else None
            json_path, md_path = write_results(results, folder, meta, image=image)
            if features is not None:  # per-image features, for a bootstrap afterwards
                torch.save(features, folder / "test_features.pt")
            print(md_path.read_text())
            written = f"{json_path}, {md_path} and {grid}" if grid else f"{json_path} and {md_path}"
            print(f"metrics written to {written}")
        self._test_grid = {}

    def save_test_grid(self, path: Path, step: int) -> Path | None:
        """Rank 0: the first test batch as rows of condition | samples at each of
        ``test_steps`` | ground truth, saved at ``path`` and added to TensorBoard
        (``test/samples``). None when no real batch was kept."""
        kept = self._test_grid
        if not kept:
            return None
        columns = [kept["cond"], *(kept[str(s)] for s in self.hparams.test_steps), kept["truth"]]
        grid = save_grid(columns, path)
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image("test/samples", grid, step)
        return path

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Images for the batch's inputs, each at its condition's size; a padding batch is
        sampled too (FSDP2) and returns none. Conditions of several sizes (a list, see
        ``data.folder.collate_conditions``) are sampled one size at a time. ``skipped``
        passes the unusable inputs on to the writer. With ``predict_tasks`` every task
        samples the batch in turn, its images named ``<task>/<name>``."""
        if not self._task_states:
            images = self._predict_images(batch, batch_idx)
            names = [] if batch.get("pad") else batch["name"]
            return {"images": images, "names": names, "skipped": batch.get("skipped", [])}
        images, names = [], []
        for task in self._task_states:  # the same inputs and noise for every task
            self.use_task(task)
            images += self._predict_images(batch, batch_idx)
            names += [] if batch.get("pad") else [f"{task}/{n}" for n in batch["name"]]
        return {"images": images, "names": names, "skipped": batch.get("skipped", [])}

    def _predict_images(self, batch: dict[str, Any], batch_idx: int) -> list[Tensor]:
        keys = sample_keys(batch, "name", batch_idx)
        conds = batch["cond"]
        if isinstance(conds, Tensor):
            images = list(self._eval_samples(batch, self.hparams.predict_steps, keys).cpu())
        else:  # mixed sizes: one pass per size, in the batch's order
            images = [None] * len(conds)
            by_size: dict[tuple[int, ...], list[int]] = {}
            for i, c in enumerate(conds):
                by_size.setdefault(tuple(c.shape), []).append(i)
            for rows in by_size.values():
                part = {"cond": torch.stack([conds[i] for i in rows]),
                        "caption": [batch["caption"][i] for i in rows]}  # fmt: skip
                out = self._eval_samples(part, self.hparams.predict_steps, [keys[i] for i in rows])
                for i, image in zip(rows, out.cpu(), strict=True):
                    images[i] = image
        return [] if batch.get("pad") else images

    # the options several tasks on one backbone must share: the teacher, and the layout
    # and sampling grid of the trained part
    TASK_KEYS = ("pretrained", "revision", "weights_variant", "pixel_space", "vae_path",
                 "method", "lora_rank", "lora_alpha", "lora_targets", "adapter_cond_channels",
                 "adapter_layers", "num_grid", "cfg_aware", "shift_resolution")  # fmt: skip

    def load_tasks(self) -> None:
        """Read the trained parts of ``predict_tasks`` (what sampling uses: the EMA
        target's, or the online weights with ``eval_weights=online``), each checked
        against this model's :attr:`TASK_KEYS`; a mismatch is a ``ValueError`` naming the
        task, the option and the way out."""
        tasks = self.hparams.get("predict_tasks") or {}
        if not tasks:
            return
        if self.device_mesh is not None:
            raise ValueError(
                "model.predict_tasks under the FSDP2 preset is not supported (the trained "
                "parts are sharded): predict several tasks on one device or under DDP"
            )
        target = self.hparams.eval_weights == "target"
        own = {k for k in self.state_dict() if k.startswith("target.") == target}
        for name, path in tasks.items():
            checkpoint = read_checkpoint(path)
            hp = checkpoint.get("hyper_parameters") or {}
            if hp.get("method") == "codi":
                raise ValueError(
                    f"model.predict_tasks: {name} ({path}) is full CoDi, with a UNet of its "
                    "own; several tasks share one frozen backbone only with PE-CoDi: "
                    "predict it on its own"
                )
            for key in self.TASK_KEYS:
                mine, theirs = self.hparams.get(key), hp.get(key)
                if isinstance(mine, tuple | list) and isinstance(theirs, tuple | list):
                    mine, theirs = list(mine), list(theirs)
                if mine != theirs:
                    raise ValueError(
                        f"model.predict_tasks: {name} ({path}) has {key}={theirs!r}, the "
                        f"loaded model {key}={mine!r}; tasks on one backbone share it: "
                        "predict that task on its own (or load both in CoDiPipeline)"
                    )
            state = {k: v for k, v in checkpoint["state_dict"].items() if k in own}
            if set(state) != own:
                missing = sorted(own - set(state))
                raise ValueError(f"model.predict_tasks: {name} ({path}) has no {missing[0]}")
            self._task_states[name] = state
        self._current_task = None
        tensors = dict(self.named_parameters(remove_duplicate=False))
        tensors.update(self.named_buffers(remove_duplicate=False))
        self._task_tensors = {k: tensors[k] for k in own}  # where each task's weights go

    @torch.no_grad()
    def use_task(self, name: str) -> None:
        """Put task ``name``'s trained weights in place (copied into the adapter's and the
        LoRA's tensors; the backbone is not touched)."""
        if name == self._current_task:
            return
        for key, value in self._task_states[name].items():
            self._task_tensors[key].copy_(value)
        self._current_task = name

    def on_predict_start(self) -> None:
        """Under FSDP2, gather the sharded networks once and keep them whole: predict
        samples each input at its own size (tiles, size groups), so ranks run different
        numbers of forwards, and a sharded forward is a collective. Then read the
        ``predict_tasks``, if any."""
        keep_unsharded(self, True)
        self.load_tasks()

    def on_predict_end(self) -> None:
        keep_unsharded(self, False)
