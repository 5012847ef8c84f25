"""Stable Diffusion 1.x/2.x: one CLIP text encoder, its last hidden states as y."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..conditioning import Conditioning, PromptEncoder, tokenize
from .base import TeacherFamily, UNetExport, write_pipeline_folder

# SD's scheduler as its folders ship it (DDPM betas); fresh teachers and the tiny folders
SD_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def tiny_text_config(vocab_size: int) -> dict[str, Any]:
    """CLIPTextModel with 2 layers of width 32."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2/CLIP scheme)."""
    keep = list(range(ord("!"), ord("~") + 1))
    keep += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def build_tiny_tokenizer():
    """An offline CLIP tokenizer: byte-level characters, no merges (one token per byte).

    Built with ``CLIPTokenizer(vocab=dict, merges=list)``: the fast tokenizer's
    file-based constructor silently yields an empty vocabulary in transformers 5.
    """
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _byte_alphabet():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_tiny_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**tiny_text_config(len(tokenizer))))


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
        unet=parts.network, controlnet=controlnet, scheduler=scheduler, safety_checker=None,
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
    :func:`build_tiny_tokenizer`; ``text_tokens``: its tokenizer's length, default 77) and its DDPM
    scheduler (SD's betas) with ``prediction_type``; ``flow_shift`` is not used."""
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
