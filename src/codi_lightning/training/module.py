"""The CoDi distillation LightningModule (METHOD.md, "One training step")."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn

from ..checkpoints import (
    check_teacher,
    resolve_local_path,
)
from ..diffusion import (
    CoDiLossConfig,
    TilingConfig,
    codi_loss,
    sample_pairs,
    schedule_from_config,
)
from ..metrics import EvalSuite, MetricsConfig
from ..models import (
    Conditioning,
    build_family_adapter,
    check_resolution,
    load_teacher,
)
from ..models.lora import LowRankUpdate, WithoutLoRA, WithWeights
from .checkpointing import CheckedCheckpoints
from .checks import check_options
from .evaluation import EvaluationSteps
from .frozen import SkipFrozenState, frozen_in_bf16
from .optim import optimizers_for
from .parallel import (
    ReplicatedGrads,
    data_parallel_mesh,
    enable_memory_savers,
    shard_blocks,
)
from .randomness import RankRandomness
from .run import logs_this_step, run_dir
from .sampling import Sampling
from .teacher_io import TeacherIO
from .updates import GuardedUpdates

FROZEN_PREFIXES = ("network.", "vae.", "prompt_encoder.")


class CoDiDistillation(TeacherIO, GuardedUpdates, CheckedCheckpoints, EvaluationSteps, Sampling,
                       RankRandomness, SkipFrozenState, L.LightningModule):  # fmt: skip
    """Distil a text-to-image teacher into a 1-4 step conditional model, in one stage.

    Submodules: ``network`` (the frozen pretrained UNet or transformer, the teacher; in
    PE-CoDi also the student's backbone, shared, never copied), ``vae`` and
    ``prompt_encoder`` (frozen; the teacher family's :class:`~codi_lightning.models.PromptEncoder`, which
    turns captions and image sizes into the :class:`~codi_lightning.models.Conditioning`
    y that every network call takes), ``controlnet`` (the trainable adapter),
    ``student_network`` (a trainable copy of the network, full CoDi only) and ``target``
    (the EMA network theta^-, fp32, saved). Checkpoints written before these names
    (``student_unet.``, ``target.unet.``) still load (``checkpoints.LEGACY_PREFIXES``).
    Frozen parts (and the evaluation metrics) are left out of every state dict and
    rebuilt from ``pretrained``.

    Args:
        pretrained: hub id or local diffusers folder of the teacher: SD 1.x/2.x, SDXL or
            SD3 / SD3.5 (rectified flow), told apart by its ``model_index.json``.
        revision: hub revision of ``pretrained``.
        weights_variant: diffusers weight variant (e.g. ``fp16``).
        pixel_space: the teacher has no VAE and works on images in [-1, 1].
        vae_path: a replacement VAE (folder or hub id, e.g.
            ``madebyollin/sdxl-vae-fp16-fix``); its config gives the scaling factor.
            The stock SDXL VAE runs in fp32 (or bf16) whatever the training precision.
        method: ``pe-codi`` (the network stays frozen and shared: the adapter trains,
            and a LoRA of the network when ``lora_rank`` > 0) or ``codi`` (adapter + a
            trainable copy of the network).
        lora_rank: rank of a low-rank update (LoRA, through ``peft``) of the frozen
            network, trained with the adapter (``pe-codi`` only; 0: none). See
            docs/results_digits.md for what it buys.
        lora_alpha: LoRA scale numerator (scale ``alpha / rank``); default: the rank.
        lora_targets: module-name suffixes that take the LoRA; default: the family's
            (attention, feed-forward and convolution layers; ``models.lora``).
        adapter_cond_channels: condition-embedder widths; derived from the VAE if unset.
        adapter_condition_init: last layer of the condition embedder, ``zero`` (reference
            ControlNet code) or ``random`` (ControlNet paper); see ``build_adapter``.
        adapter_layers: SD3 teachers: joint blocks copied into the adapter (default:
            half of the transformer's); unset for UNet teachers.
        loss: the loss switches (README's table, METHOD.md step 3-5).
        num_grid: N, points of the distillation grid (k = T / N).
        per_sample_timesteps: one t per sample instead of one per batch.
        ema_decay: gamma of the target update theta^- <- gamma theta^- + (1-gamma) theta.
        cfg_aware: classifier-free-guidance-aware distillation (released code): draw
            w in ``guidance_range`` per step, guide the online and target predictions
            (a teacher with a guidance input, FLUX.1-dev: w is fed to it, one pass; the
            ODE step keeps the prompt encoder's default, 3.5).
        guidance_range: [low, high) of the integer guidance weight w (the released code's
            CFG range is [2, 14); FLUX.1-dev's embedded scale is usually 2-5).
        optimizer: optimizer factory over the trainable parameters.
        lr_scheduler: optional LR scheduler factory (stepped every optimizer step).
        seed: seed of the per-step noise and timesteps (with the global step and rank,
            so a resumed run draws what an uninterrupted one would).
        val_steps: step counts shown in the validation grid.
        val_images: rows of the validation grid.
        val_guidance_scale: classifier-free guidance scale at validation (1 = off; with
            a guidance input, FLUX.1-dev, a scale other than 1 is fed to it and 1 keeps
            its default, 3.5).
        test_steps: step counts evaluated by ``codi-lightning test``.
        eval_weights: sample with the EMA ``target`` (default) or the ``online`` weights in
            test and predict.
        eval_guidance_scale: classifier-free guidance scale in test and predict (as
            ``val_guidance_scale``).
        eval_stochastic: multistep sampler with fresh noise (as LCMScheduler) in test and
            predict, instead of the deterministic one.
        metrics: which metrics ``test`` computes, and their weights.
        predict_steps: sampling steps of ``codi-lightning predict``.
        predict_tasks: several trained tasks on one loaded backbone in ``predict``:
            ``{name: checkpoint}``, each a PE-CoDi checkpoint of the same teacher and
            adapter/LoRA layout (say an SR one and an inpainting one). Every input is
            sampled by every task and written to ``<output>/<name>/``; between tasks
            only the trained part (adapter and LoRA) is swapped, the backbone stays.
        tiling: when large outputs are sampled in overlapping tiles (``mode``,
            ``tile_size``, ``overlap``, ``untiled_max_pixels``; sizes in output pixels),
            see :class:`~codi_lightning.diffusion.TilingConfig`.
        grad_clip_norm: clip the trainable gradients to this total norm (works under FSDP2
            and DDP; use it instead of ``trainer.gradient_clip_val``).
        max_nonfinite_steps: a step whose loss or gradients are not finite is skipped (no
            optimizer or EMA update, counted in ``train/nonfinite_steps``); this many in a
            row stop the run with an error naming the step.
        gradient_checkpointing: activation checkpointing in the adapter and the UNets.
        channels_last: channels-last memory format for the UNets and the adapter.
        compile: ``torch.compile`` the UNets and the adapter (``nn.Module.compile``, so
            checkpoint keys do not change).
        shift_resolution: the image size in pixels that fixes the sigma shift of a teacher
            whose scheduler shifts by image size (Flux's ``use_dynamic_shifting``); None:
            ``data.resolution`` when the run starts (recorded in the checkpoint). Other
            teachers ignore it.
        frozen_dtype: dtype of the frozen teacher, VAE and text encoder: ``auto`` (bf16 on
            CUDA under bf16 precision, else fp32), ``fp32`` or ``bf16``.
    """

    skipped_prefixes = FROZEN_PREFIXES + ("eval_suite.",)
    steps_on_grid = True  # the consistency sampler takes its steps from the training grid

    def __init__(
        self,
        pretrained: str,
        revision: str | None = None,
        weights_variant: str | None = None,
        pixel_space: bool = False,
        vae_path: str | None = None,
        method: Literal["pe-codi", "codi"] = "pe-codi",
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_targets: Sequence[str] | None = None,
        adapter_cond_channels: tuple[int, ...] | None = None,
        adapter_condition_init: Literal["zero", "random"] = "zero",
        adapter_layers: int | None = None,
        loss: CoDiLossConfig = CoDiLossConfig(),
        num_grid: int = 50,
        per_sample_timesteps: bool = False,
        ema_decay: float = 0.999,
        cfg_aware: bool = False,
        guidance_range: tuple[int, int] = (2, 14),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
        val_steps: Sequence[int] = (1, 2, 4),
        val_images: int = 4,
        val_guidance_scale: float = 1.0,
        test_steps: Sequence[int] = (1, 2, 4),
        eval_weights: Literal["target", "online"] = "target",
        eval_guidance_scale: float = 1.0,
        eval_stochastic: bool = False,
        metrics: MetricsConfig = MetricsConfig(),
        predict_steps: int = 4,
        predict_tasks: dict[str, str] | None = None,
        tiling: TilingConfig = TilingConfig(),
        grad_clip_norm: float | None = None,
        max_nonfinite_steps: int = 10,
        gradient_checkpointing: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        frozen_dtype: Literal["auto", "fp32", "bf16"] = "auto",
        shift_resolution: int | None = None,
    ) -> None:
        super().__init__()
        check_options(
            method=method, lora_rank=lora_rank, ema_decay=ema_decay, num_grid=num_grid,
            on_grid=self.steps_on_grid, val_steps=val_steps, test_steps=test_steps,
            predict_steps=predict_steps, guidance_range=guidance_range, val_images=val_images,
            max_nonfinite_steps=max_nonfinite_steps, grad_clip_norm=grad_clip_norm,
            eval_weights=eval_weights, predict_tasks=predict_tasks,
        )  # fmt: skip
        self.loss_config = loss if isinstance(loss, CoDiLossConfig) else CoDiLossConfig(**loss)
        self.metrics_config = (
            metrics if isinstance(metrics, MetricsConfig) else MetricsConfig(**metrics)
        )
        self.tiling = tiling if isinstance(tiling, TilingConfig) else TilingConfig(**tiling)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        # plain types only, so checkpoints load with torch.load(weights_only=True)
        self.hparams["loss"] = dataclasses.asdict(self.loss_config)
        self.hparams["metrics"] = dataclasses.asdict(self.metrics_config)
        self.hparams["tiling"] = dataclasses.asdict(self.tiling)
        self.hparams["val_steps"] = [int(s) for s in val_steps]
        self.hparams["test_steps"] = [int(s) for s in test_steps]
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler

        check_teacher(
            pretrained,
            "--model.pretrained PATH (in Python: "
            f"{type(self).__name__}.load_from_checkpoint(ckpt, pretrained=PATH))",
        )
        # recorded absolute: the checkpoint loads from any working directory
        pretrained = self.hparams["pretrained"] = resolve_local_path(pretrained)
        check_teacher(vae_path, "--model.vae_path PATH")
        vae_path = self.hparams["vae_path"] = resolve_local_path(vae_path)
        # frozen_dtype=bf16: the frozen parts load in bf16, so the fp32 ones are never
        # held (SDXL: 22.6 GB at the peak otherwise; docs/performance.md); the trained
        # copies below are made fp32 from them. ``auto`` decides in configure_model.
        parts = load_teacher(
            pretrained, revision=revision, variant=weights_variant, pixel_space=pixel_space,
            vae_path=vae_path, torch_dtype=torch.bfloat16 if frozen_dtype == "bf16" else None,
        )  # fmt: skip
        self.network, self.vae, self.prompt_encoder = parts.network, parts.vae, parts.prompt_encoder
        self.vae_scale, self.scaling_factor = parts.vae_scale, parts.scaling_factor
        self.shift_factor = parts.shift_factor  # SD3's VAE: latents are (z - shift) * scale
        self.vae_upcast = parts.vae_upcast  # never fp16 (SDXL's VAE overflows there)
        self.family = parts.family  # how the networks are called
        # VP or rectified flow, from the scheduler config; plain tensors, not buffers
        # (Lightning would cast buffers to bf16). A size-dependent (Flux) schedule waits
        # for the resolution when it is not given (``setup``).
        self.scheduler_config = parts.scheduler_config
        self.schedule = None
        if shift_resolution is not None or not parts.scheduler_config.get("use_dynamic_shifting"):
            self._set_schedule(shift_resolution)

        # the condition embedder is freshly initialised: seed it, so every rank (FSDP2 does
        # not broadcast) and every rerun builds the same adapter
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.controlnet = build_family_adapter(
                parts, adapter_cond_channels, adapter_condition_init, adapter_layers
            ).float()
        self.controlnet.train()
        self.lora: LowRankUpdate | None = None
        if lora_rank:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1)
                self.lora = LowRankUpdate(
                    self.network, lora_rank, lora_targets or self.family.lora_targets, lora_alpha
                )
            self.lora.to_fp32()
            self.hparams["lora_targets"] = list(self.lora.targets)
        self.student_network = None
        if method == "codi":
            self.student_network = copy.deepcopy(self.network).float().requires_grad_(True).train()
        target = {"controlnet": copy.deepcopy(self.controlnet)}
        if self.student_network is not None:
            target["network"] = copy.deepcopy(self.student_network)
        if self.lora is not None:
            target["lora"] = self.lora.target_copy()
        self.target = nn.ModuleDict(target).requires_grad_(False).eval()
        self._empty_text: Conditioning | None = None
        self._checkpoint_step = 0
        self.eval_suite: EvalSuite | None = None
        self._test_grid: dict[str, Tensor] = {}  # rank 0: columns of test_samples.png
        self._model_configured = False
        self._run_dir: Path | None = None
        self._tile_size = 512  # tiling.tile_size's default: the run's data.resolution (setup)
        self._skip_update = False  # this step's gradients were not finite: no EMA update
        self._replicated: ReplicatedGrads | None = None  # FSDP2: the LoRA's gradient sync
        self._task_states: dict[str, dict[str, Tensor]] = {}  # predict_tasks, loaded
        self._task_tensors: dict[str, Tensor] = {}
        self._current_task: str | None = None
        self._nonfinite_run = self._nonfinite_total = 0  # skipped steps: in a row, in all

    def _set_schedule(self, resolution: int | None) -> None:
        """The schedule of the teacher's scheduler config; for a size-dependent one, at
        ``resolution`` (square images: ``(resolution / vae_scale / 2)^2`` tokens of
        2x2-packed latents, as the Flux pipelines count them)."""
        tokens = None if resolution is None else (int(resolution) // self.vae_scale // 2) ** 2
        self.schedule = schedule_from_config(self.scheduler_config, tokens)

    # ------------------------------------------------------------------ networks
    def trainable_modules(self) -> dict[str, nn.Module]:
        """theta: the modules the optimizer and the EMA see, keyed like ``self.target``."""
        mods = {"controlnet": self.controlnet}
        if self.student_network is not None:
            mods["network"] = self.student_network
        if self.lora is not None:
            mods["lora"] = self.lora
        return mods

    def train(self, mode: bool = True) -> CoDiDistillation:
        super().train(mode)
        for frozen in (self.network, self.vae, self.prompt_encoder, self.target):
            if frozen is not None:
                frozen.eval()
        return self

    def denoiser(
        self,
        which: Literal["online", "target", "teacher"],
        text: Conditioning | Tensor,
        cond: Tensor,
        guidance: float | None = None,
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """A ``(z, t) -> o`` callable for the diffusion functions, condition bound
        (``text``: y as a :class:`Conditioning`; a bare text embedding is accepted;
        ``cond``: :meth:`adapter_condition` of the condition).

        With ``guidance`` the output is ``uncond + w (cond - uncond)`` from one batched
        pass over the conditional and the empty prompt (:meth:`unconditional`); for a
        guidance-distilled teacher (FLUX.1-dev: y carries a ``guidance`` input) it is one
        pass with w fed to that input instead (METHOD.md, "Other teacher families").
        """
        text = Conditioning.of(text)
        if which == "online":
            network = self.network if self.student_network is None else self.student_network
            controlnet = self.controlnet
        elif which == "target":
            network = self.target["network"] if "network" in self.target else self.network
            if self.lora is not None:  # the EMA LoRA in place for this call only
                network = WithWeights(self.network, self.lora.by_network_name(self.target["lora"]))
            controlnet = self.target["controlnet"]
        else:
            network, controlnet = self.network, None
            if self.lora is not None:  # the teacher: the shared network, LoRA off
                network = WithoutLoRA(self.network)
        if guidance is None:
            return partial(self._controlled, network, controlnet, text=text, cond=cond)
        embedded = self.embedded_guidance(text, guidance)
        if embedded is not None:
            return partial(self._controlled, network, controlnet, text=embedded, cond=cond)

        def guided(z: Tensor, t: Tensor) -> Tensor:
            both = self._controlled(
                network,
                controlnet,
                torch.cat([z, z]),
                torch.cat([t, t]),
                Conditioning.cat([text, self.unconditional(text)]),
                torch.cat([cond, cond]),
            )
            c, u = both.chunk(2)
            return u + guidance * (c - u)

        return guided

    def configure_model(self) -> None:
        """Memory savers, frozen-part dtype and, under ``ModelParallelStrategy``, FSDP2."""
        if self._model_configured:
            return
        hp = self.hparams
        trained = list(self.trainable_modules().values())
        nets = [self.network, *trained, *self.target.values()]
        enable_memory_savers(nets, hp.gradient_checkpointing, hp.channels_last)
        trainer = self._trainer
        if frozen_in_bf16(
            hp.frozen_dtype,
            None if trainer is None else str(trainer.precision),
            trainer is not None and trainer.strategy.root_device.type == "cuda",
        ):
            # frozen: no master weights needed
            for m in (self.network, self.vae, self.prompt_encoder):
                if m is not None:
                    m.to(torch.bfloat16)
            if self.lora is not None:  # trained inside the bf16 network: fp32 master weights
                self.lora.to_fp32()
        fsdp1 = self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)
        if fsdp1 and self.lora is not None:
            raise ValueError(
                f"model.lora_rank={hp.lora_rank} under FSDP1 (FSDPStrategy) is not supported: "
                "use the FSDP2 preset (configs/trainer/fsdp.yaml) or DDP"
            )
        mesh = data_parallel_mesh(self.device_mesh)
        if mesh is not None and self.lora is not None:  # replicated, as its frozen network
            self._replicated = ReplicatedGrads(list(self.lora.parameters()), mesh.get_group())
            self._replicated.broadcast()
            with torch.no_grad():  # the EMA copy starts from the broadcast weights
                for key, p in self.lora.weights.items():
                    self.target["lora"][key].copy_(p)
        if mesh is not None:
            for key, module in self.trainable_modules().items():
                if key == "lora":  # whole on every rank, inside the replicated network
                    continue
                shard_blocks(module, mesh)
                shard_blocks(self.target[key], mesh)
        if hp.compile:
            for m in nets:
                m.compile()
        self._model_configured = True

    # ------------------------------------------------------------------ training
    def compute_loss(self, batch: dict[str, Any], gen: torch.Generator) -> tuple[Tensor, dict]:
        hp = self.hparams
        x = self.batch_latents(batch, gen)  # clean latent x (METHOD.md, Notation)
        cond, text = self.adapter_condition(batch["cond"]), self.batch_conditioning(batch)
        noise = self.rank_slice_randn(x.shape, gen)  # eps ~ N(0, I)
        b, world = x.shape[0], self._rank_and_world()[1]
        t, s = sample_pairs(  # (t, s = max(t - k, 0)) on the grid, drawn for the global batch
            b * world, self.schedule.num_train_timesteps, hp.num_grid,
            hp.per_sample_timesteps, generator=gen, device=x.device,
        )  # fmt: skip
        t, s = self.rank_slice(t, b), self.rank_slice(s, b)

        w = None
        if hp.cfg_aware:  # released code: one integer w per step, never inside the ODE step
            low, high = hp.guidance_range
            w = float(torch.randint(low, high, (1,), generator=gen, device=x.device).item())
        online = self.denoiser("online", text, cond, w)  # step 2, with grad
        target = self.denoiser("target", text, cond, w)  # step 4, theta^-
        solver = {  # step 3: which model takes the ODE step
            "self": None if w is None else self.denoiser("online", text, cond),
            "target": self.denoiser("target", text, cond),
            "teacher": self.denoiser("teacher", text, cond),
        }[self.loss_config.solver]
        return codi_loss(online, target, solver, x, noise, t, s, self.schedule, self.loss_config)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        gen = self.step_generator(micro_batch=self.micro_batch_index(batch_idx))
        loss, terms = self.compute_loss(batch, gen)  # METHOD.md steps 1-5
        if logs_this_step(self._trainer):  # only the steps the loggers write
            self.log("train/loss", terms.pop("loss"), prog_bar=True)
            self.log_dict({f"train/{k}": v for k, v in terms.items()})
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
            for reason, count in (batch.get("skipped") or {}).items():  # cumulative, per worker
                self.log(f"data/skipped_{reason}", float(count))
        return loss

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.trainable_modules().values() for p in m.parameters()]

    def configure_optimizers(self) -> Any:
        return optimizers_for(
            self.trainable_parameters(), self.optimizer_factory, self.lr_scheduler_factory
        )

    @property
    def run_dir(self) -> Path:
        """The run folder, found in ``setup`` on every rank (``Trainer.log_dir`` is a
        collective); ``default_root_dir`` before that."""
        return self._run_dir or Path(self.trainer.default_root_dir)

    # ------------------------------------------------------------------ checkpoints
    def setup(self, stage: str) -> None:
        self._run_dir = run_dir(self.trainer)  # a collective: here, where every rank is
        datamodule = getattr(self.trainer, "datamodule", None)
        resolution = getattr(datamodule, "resolution", None)
        if resolution is not None:
            self._tile_size = int(resolution)
        if stage == "fit" and hasattr(datamodule, "expect_cache"):
            datamodule.expect_cache(self.cache_spec())
        if resolution is not None and stage in ("fit", "validate", "test"):
            check_resolution(int(resolution), self.vae_scale, self.network)
        if self.schedule is None:  # a size-dependent schedule: the run's resolution
            self._set_schedule(resolution)
            self.hparams["shift_resolution"] = int(resolution)  # the checkpoint records it

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._checkpoint_step = int(checkpoint.get("global_step", 0))
        # a size-dependent (Flux) schedule is the one the checkpoint was trained on, even
        # when test or predict runs at another data.resolution
        trained = (checkpoint.get("hyper_parameters") or {}).get("shift_resolution")
        if trained is not None and self.scheduler_config.get("use_dynamic_shifting"):
            self._set_schedule(int(trained))
            self.hparams["shift_resolution"] = int(trained)
