"""Stable Diffusion 1.x/2.x: one CLIP text encoder, its last hidden states as y."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..conditioning import Conditioning, PromptEncoder, tokenize
from .base import TeacherFamily, UNetExport, write_pipeline_folder


class CLIPPromptEncoder(PromptEncoder):
    """y = CLIP last hidden states [B, L, D]; no added conditions."""

    def __init__(self, text_encoder: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], device: torch.device | str) -> Conditioning:
        ids = tokenize(self.tokenizer, prompts).to(device)
        return Conditioning(self.text_encoder(ids)[0])


def load_prompt_encoder(
    pretrained: str, index: Mapping[str, Any], kw: dict[str, Any], weights: dict[str, Any]
) -> CLIPPromptEncoder:
    """``text_encoder/`` (CLIPTextModel) and ``tokenizer/`` of a diffusers folder."""
    from transformers import CLIPTextModel, CLIPTokenizer

    text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", **weights)
    tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kw)
    return CLIPPromptEncoder(text_encoder, tokenizer)


def forward(
    unet: nn.Module,
    controlnet: nn.Module | None,
    z: Tensor,
    timestep: Tensor,
    text: Conditioning,
    cond: Tensor,
) -> Tensor:
    """F(z_t, t, y, c): the UNet with the ControlNet's residuals (no adapter: the
    teacher). Both networks get y whole: the text sequence and any added conditions
    (SDXL). ``cond`` is the condition image in [0, 1]."""
    down = mid = None
    y = text.network_kwargs()
    if controlnet is not None:
        down, mid = controlnet(z, timestep, controlnet_cond=cond, return_dict=False, **y)
    return unet(
        z,
        timestep,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
        **y,
    ).sample


def assemble_pipeline(parts: Any, controlnet: nn.Module, scheduler: Any) -> Any:
    """The stock ``StableDiffusionControlNetPipeline`` of loaded parts (no safety checker)."""
    from diffusers import StableDiffusionControlNetPipeline

    return StableDiffusionControlNetPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
        unet=parts.unet, controlnet=controlnet, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def save_teacher_folder(
    folder: str | Path,
    unet,
    text_encoder,
    tokenizer,
    scheduler_config: dict[str, Any],
    vae=None,
) -> Path:
    """Write teacher parts in the Stable Diffusion folder layout (safetensors) with a
    ``model_index.json``, so ``load_teacher`` and diffusers pipelines can read it; no
    ``vae/`` for a pixel-space model."""
    components: dict[str, Any] = {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    if vae is not None:
        components["vae"] = ["diffusers", "AutoencoderKL"]
        components |= {"safety_checker": [None, None], "feature_extractor": [None, None]}
        components["requires_safety_checker"] = False
    parts = {"tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet, "vae": vae}
    scheduler = {"_class_name": "DDPMScheduler", **dict(scheduler_config)}
    index = {"_class_name": "StableDiffusionPipeline", **components}
    return write_pipeline_folder(folder, parts, scheduler, index)


def write_folder(
    folder: str | Path, unet: nn.Module, prompt_encoder: CLIPPromptEncoder,
    scheduler_config: dict[str, Any], vae: nn.Module | None = None,
) -> Path:  # fmt: skip
    """:func:`save_teacher_folder` of a network and its prompt encoder (the record's
    ``write_folder``)."""
    return save_teacher_folder(
        folder, unet, prompt_encoder.text_encoder, prompt_encoder.tokenizer, scheduler_config, vae
    )


def fresh(
    text_tokens: int | None, flow_shift: float, prediction_type: str
) -> tuple[CLIPPromptEncoder, dict[str, Any]]:
    """A fresh pixel-space SD-layout teacher's text side (the tiny offline CLIP of
    ``models.tiny``; ``text_tokens``: its tokenizer's length, default 77) and its DDPM
    scheduler (SD's betas) with ``prediction_type``; ``flow_shift`` is not used."""
    from ..tiny import SD_SCHEDULER, build_tiny_text_encoder, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    if text_tokens is not None:
        tokenizer.model_max_length = int(text_tokens)
    encoder = CLIPPromptEncoder(build_tiny_text_encoder(tokenizer), tokenizer)
    return encoder, {**SD_SCHEDULER, "prediction_type": prediction_type}


FAMILY = TeacherFamily(
    "sd",
    load_prompt_encoder,
    forward,
    unet_export=UNetExport(
        "StableDiffusionControlNetPipeline",
        "safety_checker=None, requires_safety_checker=False",
        assemble_pipeline,
    ),
    write_folder=write_folder,
    fresh=fresh,
)
