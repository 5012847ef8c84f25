"""Stable Diffusion 1.x/2.x: one CLIP text encoder, its last hidden states as y."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..conditioning import Conditioning, PromptEncoder, tokenize
from .base import TeacherFamily


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


FAMILY = TeacherFamily("sd", load_prompt_encoder, forward)
