"""Ordinary diffusion training: make or adapt a teacher (``configs/toy/teacher.yaml``;
``configs/digits/flow_teacher.yaml`` makes a rectified-flow transformer teacher)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from ..checkpoints import check_teacher, resolve_local_path
from ..diffusion import (
    NoiseSchedule,
    diffusion_loss,
    ema_update,
    schedule_from_config,
    to_x_eps,
    vp_view_of_flow,
)
from ..models import Conditioning, load_teacher
from ..models.teachers import (
    FAMILIES,
    family_of,
    family_of_network,
    fresh_network,
    read_model_index,
)
from .ddim import ode_sample
from .frozen import SkipFrozenState
from .optim import optimizers_for
from .randomness import RankRandomness
from .run import logs_this_step, run_dir
from .teacher_io import TeacherIO
from .visualize import save_grid


class DiffusionTraining(TeacherIO, RankRandomness, SkipFrozenState, L.LightningModule):
    """Train a text-conditional UNet (or a flow transformer) with the ordinary
    diffusion loss and write it as a diffusers teacher folder (EMA weights) that the
    distillation configs point at.

    Args:
        output_dir: where the teacher folder is written at the end of ``fit``.
        init_from: an existing teacher (hub id or folder) to adapt; ``None`` builds a
            fresh pixel-space model from ``unet`` or ``transformer`` (there is no
            pretrained VAE to use).
        pixel_space: the network works on images in [-1, 1] (no VAE).
        prediction_type: ``epsilon`` or ``v_prediction`` (fresh UNets only).
        unet: UNet2DConditionModel config of a fresh VP model (SD layout, one tiny CLIP).
        transformer: the diffusers config of a fresh rectified-flow transformer, of the
            class its ``_class_name`` names (default ``SD3Transformer2DModel``; also
            ``SanaTransformer2DModel``), written in its family's layout with the family's
            tiny offline text side (``TeacherFamily.fresh``): velocity targets, timesteps
            drawn uniformly on the shifted sigma table, validation samples by the Euler
            method.
        flow_shift: the sigma shift of a fresh flow model (SD3 uses 3.0 at 1024 px;
            smaller images want less).
        text_tokens: the token length of each tokenizer of a fresh model (default: its
            family's). Where the text tokens go through every block as the image's do
            (joint attention), a short text (8 a tokenizer) makes a small model's steps
            about twice as fast (docs/results_digits.md, "The flow teacher").
        velocity_teacher: a trained VP teacher folder (a UNet of the same pixel space,
            e.g. ``bench/assets/digits_teacher``) whose clean-image estimate ``x_T`` sets a
            fresh flow model's target where its noise levels reach: ``v = (z - x_T) /
            sigma``, the teacher's estimate of ``E[eps - x | z]``, instead of the one-sample
            ``eps - x``; the data target outside its noise levels. The target then has
            no sampling noise, where at high noise one noisy sample says little about
            where the strokes go (tried on the digits testbed's flow teacher: its
            transformer did no better; docs/results_digits.md, "The flow teacher"). The
            validation loss stays the data loss.
        ema_decay: decay of the EMA copy that is exported.
        optimizer, lr_scheduler: factories (YAML-injectable).
        val_steps: DDIM steps of the validation samples.
        val_images: validation grid rows.
    """

    # frozen, rebuilt in __init__
    skipped_prefixes = ("vae.", "prompt_encoder.", "velocity_network.", "velocity_text.")

    def __init__(
        self,
        output_dir: str,
        init_from: str | None = None,
        pixel_space: bool = True,
        prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
        unet: dict[str, Any] | None = None,
        transformer: dict[str, Any] | None = None,
        flow_shift: float = 1.0,
        text_tokens: int | None = None,
        velocity_teacher: str | None = None,
        ema_decay: float = 0.999,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        val_steps: int = 50,
        val_images: int = 8,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        check_teacher(
            init_from,
            "--model.init_from PATH (in Python: "
            f"{type(self).__name__}.load_from_checkpoint(ckpt, init_from=PATH))",
        )
        # recorded absolute: the checkpoint works from any working directory
        init_from = self.hparams["init_from"] = resolve_local_path(init_from)
        self.hparams["output_dir"] = resolve_local_path(output_dir, always_local=True)
        self.shift_factor, self.vae_upcast, self._empty_text = 0.0, False, None
        if init_from:
            family = family_of(read_model_index(init_from))
            if family.write_folder is None:  # what export() can write back
                writable = ", ".join(f.name for f in FAMILIES.values() if f.write_folder)
                raise ValueError(
                    f"model.init_from={init_from!r} is a {family} teacher: DiffusionTraining "
                    f"adapts and writes the folders of these families only: {writable}"
                )
            parts = load_teacher(init_from, pixel_space=pixel_space)
            self.network, self.vae = parts.network, parts.vae
            self.prompt_encoder = parts.prompt_encoder
            self.scheduler_config, self.family = parts.scheduler_config, parts.family
            self.scaling_factor, self.shift_factor = parts.scaling_factor, parts.shift_factor
            self.vae_upcast = parts.vae_upcast
            self.network.requires_grad_(True).train()
        else:
            if not pixel_space:
                raise ValueError(
                    "a fresh teacher needs model.pixel_space: true (there is no pretrained VAE "
                    "to train in latent space); or set model.init_from to adapt a teacher"
                )
            if (unet is None) == (transformer is None):
                raise ValueError(
                    "give model.unet (a UNet2DConditionModel config) or model.transformer (a "
                    "flow transformer's config: SD3Transformer2DModel, or another class named by "
                    "its _class_name key), one of them, or model.init_from"
                )
            kind = "unet" if transformer is None else "transformer"
            self.network = fresh_network(unet if transformer is None else transformer, kind)
            self.family = family_of_network(self.network)  # the layout export() writes
            with torch.random.fork_rng(devices=[]):  # frozen and not checkpointed: rebuild it
                torch.manual_seed(0)  # identically on every rank and every load
                encoder, self.scheduler_config = self.family.fresh(
                    text_tokens, float(flow_shift), prediction_type
                )
            self.prompt_encoder = encoder.requires_grad_(False).eval()
            self.vae, self.scaling_factor = None, 1.0
        self.schedule = schedule_from_config(self.scheduler_config)
        self.velocity_network = self.velocity_text = None
        if velocity_teacher is not None:
            self._load_velocity_teacher(velocity_teacher, pixel_space)
        self.ema_network = copy.deepcopy(self.network).requires_grad_(False).eval()
        if self.vae is not None:
            self.vae.requires_grad_(False).eval()

    def _load_velocity_teacher(self, folder: str, pixel_space: bool) -> None:
        option = f"model.velocity_teacher={folder!r}"
        if self.schedule.prediction_type != "flow":
            raise ValueError(f"{option}: velocity targets are for a flow model (model.transformer)")
        if not pixel_space or self.vae is not None:
            raise ValueError(f"{option}: velocity targets need a pixel-space model (no VAE)")
        check_teacher(folder, "--model.velocity_teacher PATH")
        self.hparams["velocity_teacher"] = folder = resolve_local_path(folder)
        parts = load_teacher(folder, pixel_space=True)
        schedule = schedule_from_config(parts.scheduler_config)
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"{option} is a flow teacher: give a VP (DDPM-schedule) teacher")
        self.velocity_network = parts.network.requires_grad_(False).eval()
        self.velocity_text = parts.prompt_encoder.requires_grad_(False).eval()
        self.velocity_family, self.velocity_schedule = parts.family, schedule
        abar = schedule.alphas_cumprod[[0, -1]]  # the flow sigmas it reaches
        ratio = (1 - abar).sqrt() / (abar.sqrt() + (1 - abar).sqrt())
        self.velocity_reach = (float(ratio[0]), float(ratio[1]))

    @torch.no_grad()
    def teacher_velocity(self, z: Tensor, sigma: Tensor, captions: list[str]) -> Tensor:
        """``(z - x_T) / sigma``: the velocity teacher's estimate of ``E[eps - x | z]`` at
        the flow state ``z`` of noise level ``sigma`` ([B, 1, 1, 1], within its reach)."""
        t, a, b = vp_view_of_flow(self.velocity_schedule.alphas_cumprod, sigma)
        text = self.velocity_text.encode_distinct(captions, z.device)
        z_vp = (a + b) * z
        out = self.velocity_family.forward(
            self.velocity_network, None, z_vp, t.view(-1), text, None
        )
        x_t = to_x_eps(out.float(), z_vp, a, b, self.velocity_schedule.prediction_type)[0]
        return (z - x_t) / sigma

    def train(self, mode: bool = True) -> DiffusionTraining:
        super().train(mode)
        frozen_parts = (self.vae, self.prompt_encoder, self.ema_network, self.velocity_network)
        for frozen in frozen_parts:
            if frozen is not None:
                frozen.eval()
        return self

    def denoiser(self, network: torch.nn.Module, text: Conditioning):
        """``(z, t) -> F(z, t, y)``: the network alone, called through the teacher I/O the
        distillation uses (its family's call, the schedule's network timestep)."""
        return lambda z, t: self._controlled(network, None, z, t, text, None)

    def diffusion_loss(self, batch: dict[str, Any], data_target: bool = False) -> Tensor:
        """``|| F(z_t, t, y) - target ||^2`` with t uniform in [0, T) (flow: the velocity
        target at the shifted sigma of t; with a velocity teacher and not ``data_target``,
        the teacher's velocity where it reaches)."""
        x = self.batch_latents(batch, None)
        text = self.encode_text(batch["caption"])
        noise = torch.randn_like(x)
        t = torch.randint(0, self.schedule.num_train_timesteps, (x.shape[0],), device=x.device)
        model = self.denoiser(self.network, text)
        if self.velocity_network is None or data_target:
            return diffusion_loss(model, x, noise, t, self.schedule)
        alpha, sigma = self.schedule.alpha_sigma(t, x)
        z = alpha * x + sigma * noise
        low, high = self.velocity_reach
        reach = (sigma >= low) & (sigma <= high)
        taught = self.teacher_velocity(z, sigma.clamp(low, high), batch["caption"])
        target = torch.where(reach, taught, noise - x)
        return F.mse_loss(model(z, t).float(), target)

    @torch.no_grad()
    def sample(self, text: Conditioning, noise: Tensor, steps: int) -> Tensor:
        """The EMA network's samples: DDIM (VP) or the Euler method (flow), ``ode_sample``."""
        model = self.denoiser(self.ema_network, text)
        return ode_sample(model, noise, self.schedule, self.scheduler_config, steps)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.diffusion_loss(batch)
        if logs_this_step(self._trainer):  # only the steps the loggers write
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def ema_decay_now(self) -> float:
        """EMA decay with warm-up, ``min(decay, (1 + n) / (10 + n))`` after n updates, so
        short runs do not export weights still dominated by the random initialisation."""
        n = self.global_step
        return min(self.hparams.ema_decay, (1 + n) / (10 + n))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        ema_update(self.ema_network.parameters(), self.network.parameters(), self.ema_decay_now())

    def configure_optimizers(self) -> Any:
        return optimizers_for(
            self.network.parameters(), self.optimizer_factory, self.lr_scheduler_factory
        )

    def setup(self, stage: str) -> None:
        self.run_dir = run_dir(self.trainer)  # a collective: here, where every rank is

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Validation loss (padding batches weigh 0) and, for the first batch, a grid of
        DDIM samples: every rank samples (the same forwards everywhere), rank 0 writes."""
        weight = 0 if batch.get("pad") else len(batch["image"])
        self.log("val/loss", self.diffusion_loss(batch, True), batch_size=weight, sync_dist=True)
        if batch_idx == 0 and not self.trainer.sanity_checking:
            n = min(self.hparams.val_images, len(batch["image"]))
            text = self.encode_text(batch["caption"][:n])
            gen = torch.Generator(device=self.device).manual_seed(0)
            shape = self.batch_latents(batch, None)[:n].shape
            noise = torch.randn(shape, generator=gen, device=self.device)
            images = self.decode_latents(self.sample(text, noise, self.hparams.val_steps))
            if self.global_rank != 0 or batch.get("pad"):
                return
            grid = save_grid(
                [images, (batch["image"][:n] + 1) / 2],
                self.run_dir / "samples" / f"step_{self.global_step:07d}.png",
            )
            experiment = getattr(self.logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("val/samples", grid, self.global_step)

    def on_train_end(self) -> None:
        """Write the EMA network with the other parts as a teacher folder (rank 0)."""
        if self.global_rank == 0:
            path = self.export(self.hparams.output_dir)
            print(f"teacher written to {path}")

    def export(self, folder: str) -> Path:
        """The EMA network with the other parts, written in its family's layout."""
        network = copy.deepcopy(self.ema_network).float().cpu()
        return self.family.write_folder(
            folder, network, self.prompt_encoder, self.scheduler_config, self.vae
        )
