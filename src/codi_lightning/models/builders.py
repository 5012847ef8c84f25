"""Load the teacher's parts and build the condition adapter (METHOD.md, "Architecture")."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

DEFAULT_COND_CHANNELS = (16, 32, 96, 256)


@dataclass
class TeacherParts:
    """What a pretrained text-to-image model contributes: all of it stays frozen."""

    unet: nn.Module
    vae: nn.Module | None
    text_encoder: nn.Module
    tokenizer: Any
    scheduler_config: dict[str, Any]

    @property
    def vae_scale(self) -> int:
        """Pixel-to-latent downsampling factor (1 in pixel-space mode)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return 1.0 if self.vae is None else float(self.vae.config.scaling_factor)


def load_teacher(
    pretrained: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    pixel_space: bool = False,
    torch_dtype: torch.dtype | None = None,
) -> TeacherParts:
    """Load UNet, VAE, text encoder, tokenizer and scheduler config from a hub id or a local
    diffusers folder (``from_pretrained`` with subfolders). ``pixel_space=True`` skips the
    VAE: the UNet then works on images in [-1, 1]."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kw: dict[str, Any] = {"revision": revision}
    weights = {**kw, "variant": variant}
    if torch_dtype is not None:
        weights["torch_dtype"] = torch_dtype
    try:
        unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", **weights)
    except OSError as err:
        raise OSError(
            f"Could not load the teacher UNet from {pretrained!r} (subfolder 'unet'). Give a "
            "hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5' with network access "
            "or the path of a local diffusers folder; `codi-lightning` tests use "
            "`codi_lightning.models.write_tiny_teacher` to make one."
        ) from err
    vae = None
    if not pixel_space:
        vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **weights)
    text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", **weights)
    tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kw)
    scheduler_config = dict(DDPMScheduler.load_config(pretrained, subfolder="scheduler", **kw))
    for module in (unet, vae, text_encoder):
        if module is not None:
            module.requires_grad_(False).eval()
    return TeacherParts(unet, vae, text_encoder, tokenizer, scheduler_config)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder: nn.Module, prompts, device: torch.device | str):
    """y: CLIP last hidden states [B, L, D], prompts padded to the tokenizer's maximum
    length (as Stable Diffusion pipelines do)."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids.to(device))[0]


def adapter_cond_channels(vae_scale: int) -> tuple[int, ...]:
    """Condition-embedder widths whose downsampling 2^(L-1) equals the VAE's factor."""
    levels = int(math.log2(vae_scale)) + 1
    if 2 ** (levels - 1) != vae_scale:
        raise ValueError(f"VAE downsampling factor {vae_scale} is not a power of two")
    base = DEFAULT_COND_CHANNELS + (256,) * max(0, levels - len(DEFAULT_COND_CHANNELS))
    return base[:levels]


def build_adapter(
    unet: nn.Module,
    vae_scale: int,
    conditioning_embedding_out_channels: tuple[int, ...] | None = None,
    conditioning_channels: int = 3,
    condition_init: str = "zero",
) -> nn.Module:
    """ControlNet initialised from the UNet (``ControlNetModel.from_unet``); its zero
    output convolutions make the adapted model equal the teacher at step 0.

    ``condition_init`` sets the last convolution of the condition embedder: ``zero`` as
    in the reference ControlNet code and diffusers, or ``random`` (PyTorch's default
    init), as the ControlNet paper describes its condition encoder ("initialized with
    Gaussian weights"). With ``zero``, no gradient reaches the condition path until the
    output convolutions have grown (two zero factors in a row), one reason a ControlNet
    is slow to start reading its input; ``random`` keeps the model equal
    to the teacher at step 0 (the output convolutions are still zero) but lets the
    adapter's features depend on the condition from the first step. (On the toy
    super-resolution bench the two inits ended 450 CoDi steps within about the seed
    spread of each other: docs/results.md.)
    """
    from diffusers import ControlNetModel

    if condition_init not in ("zero", "random"):
        raise ValueError(
            f"adapter condition_init={condition_init!r}; choose 'zero' (reference ControlNet "
            "code) or 'random' (the ControlNet paper's Gaussian init)"
        )
    channels = conditioning_embedding_out_channels or adapter_cond_channels(vae_scale)
    check_condition_downsampling(tuple(channels), vae_scale)
    adapter = ControlNetModel.from_unet(
        unet,
        conditioning_embedding_out_channels=tuple(channels),
        conditioning_channels=conditioning_channels,
    )
    if condition_init == "random":
        adapter.controlnet_cond_embedding.conv_out.reset_parameters()
    return adapter


def check_condition_downsampling(channels: tuple[int, ...], vae_scale: int) -> None:
    """The condition enters at pixel resolution; its embedder must downsample exactly as
    much as the VAE does, or the adapter fails deep inside with a shape mismatch."""
    factor = 2 ** (len(channels) - 1)
    if factor != vae_scale:
        raise ValueError(
            f"adapter conditioning_embedding_out_channels={channels} downsample the condition "
            f"by {factor}, but the latents are {vae_scale}x smaller than the image. Give "
            f"{len(adapter_cond_channels(vae_scale))} entries, e.g. "
            f"{adapter_cond_channels(vae_scale)}, or leave it unset to derive it."
        )


def check_resolution(resolution: int, vae_scale: int, unet: nn.Module) -> None:
    """The image size must reach the UNet's lowest level as an integer size."""
    unet_down = 2 ** (len(unet.config.block_out_channels) - 1)
    need = vae_scale * unet_down
    if resolution % need:
        raise ValueError(
            f"data.resolution={resolution} is not a multiple of {need} (VAE factor {vae_scale} "
            f"x UNet downsampling {unet_down}); use e.g. {max(need, resolution // need * need)}."
        )
