"""Sample with an exported CoDi folder plus its base model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..diffusion import (
    NoiseSchedule,
    TilingConfig,
    pad_to_multiple,
    sample,
    sampling_timesteps,
    tiled_over,
)
from ..models import (
    Conditioning,
    ImageSizes,
    TeacherParts,
    load_teacher,
    network_multiple,
    vae_tiles,
)
from ..models.lora import LORA_FILE


class CoDiPipeline:
    """An exported CoDi model: base model parts + ``controlnet/`` (+ ``unet/``).

    ``pipe(cond, prompts, num_steps=4)`` returns images in [0, 1]. The sampler is the
    project's (``diffusion.sample``); ``stochastic=True`` is exactly what stock
    diffusers' ``LCMScheduler`` (``scheduler/``) does, so ``to_diffusers()`` gives the
    same images; the default deterministic one is the exported ``scheduler_deterministic/``
    given the same timesteps as ``timesteps=`` (see the export's model card). SD 1.x/2.x
    and SDXL base models (``to_diffusers`` gives the family's stock ControlNet pipeline).

    Several tasks on one base network: :meth:`load_task` adds another PE-CoDi export (its
    ControlNet, and its LoRA of the UNet as a peft adapter of its own) without loading
    the base model again; :meth:`use_task` switches between them.
    """

    def __init__(
        self,
        parts: TeacherParts,
        controlnet: torch.nn.Module,
        num_grid: int,
        task: str = "default",
        lora: bool = False,
    ) -> None:
        """``lora``: the task's LoRA is loaded into ``parts.network`` as the adapter ``task``."""
        self.parts, self.controlnet, self.num_grid = parts, controlnet.eval(), num_grid
        self.schedule = NoiseSchedule.from_config(parts.scheduler_config)
        self.device = next(parts.network.parameters()).device  # ``to`` moves everything
        # task name -> (ControlNet, training grid N, has a LoRA adapter of that name)
        self.tasks: dict[str, tuple[torch.nn.Module, int, bool]] = {
            task: (self.controlnet, num_grid, lora)
        }
        self.task = task

    @classmethod
    def from_exported(
        cls,
        folder: str,
        base: str,
        *,
        pixel_space: bool = False,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        task: str = "default",
    ) -> CoDiPipeline:
        """``folder``: an export of ``base``; ``task``: the name :meth:`use_task` knows it
        by when more tasks are loaded (:meth:`load_task`)."""
        from diffusers import UNet2DConditionModel

        parts = load_teacher(base, pixel_space=pixel_space, torch_dtype=torch_dtype)
        flow = parts.family.flow_export
        if flow is not None:
            raise NotImplementedError(
                f"{base} is a flow-transformer teacher ({flow.title}): load the export into "
                f"diffusers' {flow.pipeline} "
                "(the export's README.md shows how), or sample from the checkpoint with "
                "CoDiDistillation.load_from_checkpoint"
            )
        kw = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        if (Path(folder) / "unet").is_dir():
            parts.network = UNet2DConditionModel.from_pretrained(
                folder, subfolder="unet", **kw
            ).eval()
        controlnet, num_grid, lora = _task_parts(parts.network, folder, task, kw)
        pipe = cls(parts, controlnet, num_grid, task, lora)
        return pipe.to(device)

    def load_task(self, name: str, folder: str) -> None:
        """Add the PE-CoDi export ``folder`` (trained on the same base model) as task
        ``name``: its ControlNet, and its ``lora/`` as the UNet's peft adapter ``name``.
        The base network is shared, not reloaded; the current task stays in use."""
        if name in self.tasks:
            raise ValueError(f"a task named {name!r} is loaded already: {sorted(self.tasks)}")
        if (Path(folder) / "unet").is_dir():
            raise ValueError(
                f"{folder} holds its own unet/ (full CoDi, or a merged LoRA): it cannot share "
                "the base network; load it with CoDiPipeline.from_exported on its own (or "
                "export the LoRA separately: codi-lightning export --lora separate)"
            )
        dtype = next(self.parts.network.parameters()).dtype
        controlnet, num_grid, lora = _task_parts(
            self.parts.network, folder, name, {"torch_dtype": dtype}
        )
        self.tasks[name] = (controlnet.to(self.device), num_grid, lora)
        self.use_task(self.task)  # loading an adapter activates it: keep the current task

    def use_task(self, name: str) -> None:
        """Sample with task ``name`` from now on: its ControlNet and grid, its LoRA the
        only active one (none: the base network as is)."""
        if name not in self.tasks:
            raise KeyError(f"no task named {name!r}; loaded: {sorted(self.tasks)}")
        self.controlnet, self.num_grid, lora = self.tasks[name]
        unet = self.parts.network
        if any(has for _, _, has in self.tasks.values()):
            if lora:
                unet.enable_lora()
                unet.set_adapters([name])
            else:
                unet.disable_lora()
        self.task = name

    def to(self, device: str | torch.device) -> CoDiPipeline:
        adapters = [c for c, _, _ in self.tasks.values()]
        for m in (self.parts.network, self.parts.vae, self.parts.prompt_encoder, *adapters):
            if m is not None:
                m.to(device)
        self.device = torch.device(device)
        return self

    def encode_text(self, prompts: Sequence[str], sizes: ImageSizes | None = None) -> Conditioning:
        """y for ``prompts``, with the family's size conditions (SDXL ``time_ids``)."""
        text = self.parts.prompt_encoder.encode(prompts, self.device)
        return text if sizes is None else self.parts.prompt_encoder.add_sizes(text, sizes)

    def _denoiser(self, text: Conditioning, cond: Tensor):
        """F(z, t, y, c) called the family's way (``models.teachers``), in the network's
        dtype (an fp16 pipeline gets fp16 inputs)."""
        unet, controlnet, forward = self.parts.network, self.controlnet, self.parts.family.forward

        def f(z: Tensor, t: Tensor) -> Tensor:
            dtype = unet.dtype
            return forward(unet, controlnet, z.to(dtype), t, text.to(dtype), cond.to(dtype))

        return f

    @torch.no_grad()
    def __call__(
        self,
        cond: Tensor,
        prompts: Sequence[str] | None = None,
        num_steps: int = 4,
        *,
        generator: torch.Generator | None = None,
        stochastic: bool = False,
        guidance_scale: float = 1.0,
        sizes: ImageSizes | None = None,
        tiling: TilingConfig | None = None,
    ) -> Tensor:
        """Images in [0, 1] for conditions ``cond`` ([B, 3, H, W] in [0, 1]), at the
        condition's size, any height and width: as ``CoDiDistillation.sample_images``, the
        condition is padded (reflected) to the VAE factor times the UNet's downsampling,
        sampled, and the images cropped back; with ``tiling`` (``TilingConfig``: tile size
        default 512 px) large outputs are sampled in blended tiles. ``sizes`` (SDXL)
        default to original = the condition's size, no crop, as the module's."""
        cond = cond.to(self.device)
        batch, _, height, width = cond.shape
        prompts = list(prompts) if prompts is not None else [""] * batch
        if sizes is None:
            sizes = ImageSizes.default(batch, (height, width), self.device)
        text = self.encode_text(prompts, sizes)
        unit = network_multiple(self.parts.network)[0]
        scale = self.parts.vae_scale
        cond = pad_to_multiple(cond, scale * unit)
        grid = None
        if tiling is not None and tiling.wants_tiles(height, width):
            grid = tiling.grid(*cond.shape[-2:], scale, unit, default_tile=512)

        def region(y: Conditioning):
            if grid is None:
                return self._denoiser(y, cond)
            encoder = self.parts.prompt_encoder
            return tiled_over(lambda c, box: self._denoiser(encoder.add_sizes(y, sizes.crop(*box)), c),
                              cond, grid, scale, (height, width))  # fmt: skip

        uncond = None
        if guidance_scale != 1.0:
            uncond = region(text.with_text(self.encode_text([""] * batch)))
        shape = (batch, self.parts.network.config.in_channels, cond.shape[-2] // scale,
                 cond.shape[-1] // scale)  # fmt: skip
        noise = torch.randn(shape, generator=generator, device=self.device)
        timesteps = sampling_timesteps(num_steps, self.schedule.num_train_timesteps, self.num_grid)
        vae = self.parts.vae
        with vae_tiles(vae, grid, scale):
            latents = sample(region(text), noise, self.schedule, timesteps,
                             stochastic=stochastic, generator=generator, uncond_model=uncond,
                             guidance_scale=guidance_scale)  # fmt: skip
            if vae is not None:
                if self.parts.vae_upcast and vae.dtype == torch.float16:
                    vae.float()  # the SDXL VAE overflows in fp16
                latents = latents.float() / self.parts.scaling_factor + self.parts.shift_factor
                latents = vae.decode(latents.to(vae.dtype)).sample
        images = ((latents.float() + 1) / 2).clamp(0, 1)
        return images[..., :height, :width]

    def to_diffusers(self, folder: str):
        """The family's stock ControlNet pipeline (``StableDiffusionControlNetPipeline``;
        SDXL: ``StableDiffusionXLControlNetPipeline``) with ``LCMScheduler`` from ``folder``
        (latent models only)."""
        from diffusers import LCMScheduler

        if self.parts.vae is None:
            raise ValueError("stock diffusers has no pixel-space ControlNet pipeline")
        scheduler = LCMScheduler.from_pretrained(folder, subfolder="scheduler")
        return self.parts.family.unet_export.assemble(self.parts, self.controlnet, scheduler)


def _task_parts(
    unet: torch.nn.Module, folder: str, name: str, kw: dict
) -> tuple[torch.nn.Module, int, bool]:
    """An export's ControlNet, training grid N, and whether it has a LoRA, loaded into
    ``unet`` as the peft adapter ``name``."""
    from diffusers import ControlNetModel, LCMScheduler

    lora = (Path(folder) / "lora").is_dir()
    if lora:  # a LoRA of the shared base UNet
        unet.load_lora_adapter(
            str(Path(folder) / "lora"), prefix="unet", weight_name=LORA_FILE, adapter_name=name
        )
    controlnet = ControlNetModel.from_pretrained(folder, subfolder="controlnet", **kw).eval()
    num_grid = LCMScheduler.load_config(folder, subfolder="scheduler")["original_inference_steps"]
    return controlnet, int(num_grid), lora
