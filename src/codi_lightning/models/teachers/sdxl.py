"""Stable Diffusion XL: two CLIP text encoders and size micro-conditioning (METHOD.md,
"Other teacher families"). Same VP math as SD; only the text side differs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..conditioning import Conditioning, ImageSizes, PromptEncoder, tokenize
from . import sd
from .base import TeacherFamily


class SDXLPromptEncoder(PromptEncoder):
    """y = [CLIP-L | CLIP-G] penultimate hidden states, concatenated on the feature axis
    [B, L, D1 + D2]; ``added``: ``text_embeds``, the second encoder's projected pooled
    output [B, P], and (``add_sizes``) ``time_ids`` [B, 6] = original (h, w), crop
    (top, left), target (h, w).

    ``zero_empty_prompt`` (the folder's ``force_zeros_for_empty_prompt``, on for SDXL
    base): an empty prompt's sequence and pooled embedding are zeros, as SDXL dropped
    captions in training (sgm zeroes dropped conditions) and as the stock pipeline's
    unconditional branch does. It applies to every empty caption, so caption dropout
    in training and the guidance branch see the same unconditional input.
    """

    def __init__(
        self,
        text_encoder: nn.Module,
        text_encoder_2: nn.Module,
        tokenizer: Any,
        tokenizer_2: Any,
        zero_empty_prompt: bool = True,
    ) -> None:
        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.zero_empty_prompt = zero_empty_prompt

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], device: torch.device | str) -> Conditioning:
        prompts = list(prompts)
        sequences = []
        for tokenizer, encoder in (
            (self.tokenizer, self.text_encoder),
            (self.tokenizer_2, self.text_encoder_2),
        ):
            out = encoder(tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
            sequences.append(out.hidden_states[-2])
        hidden, pooled = torch.cat(sequences, dim=-1), out.text_embeds
        if self.zero_empty_prompt:
            keep = torch.tensor([p != "" for p in prompts], device=hidden.device)
            hidden = torch.where(keep[:, None, None], hidden, torch.zeros_like(hidden))
            pooled = torch.where(keep[:, None], pooled, torch.zeros_like(pooled))
        return Conditioning(hidden, {"text_embeds": pooled})

    def add_sizes(self, cond: Conditioning, sizes: ImageSizes) -> Conditioning:
        """``time_ids`` in fp32 (the UNet's sinusoidal embedding computes in fp32; bf16
        would round sizes above 256)."""
        time_ids = torch.cat([sizes.original_size, sizes.crop_top_left, sizes.target_size], 1)
        time_ids = time_ids.to(cond.hidden_states.device, torch.float32)
        return Conditioning(cond.hidden_states, {**cond.added, "time_ids": time_ids})


def load_prompt_encoder(
    pretrained: str, index: Mapping[str, Any], kw: dict[str, Any], weights: dict[str, Any]
) -> SDXLPromptEncoder:
    """``text_encoder/`` (CLIPTextModel), ``text_encoder_2/`` (CLIPTextModelWithProjection)
    and both tokenizers of a diffusers SDXL folder."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if (index.get("text_encoder") or [None])[0] is None:
        raise ValueError(
            f"{pretrained!r} has no text_encoder/ (an SDXL refiner?); CoDi needs an SDXL base "
            "model with both text encoders"
        )
    return SDXLPromptEncoder(
        CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", **weights),
        CLIPTextModelWithProjection.from_pretrained(
            pretrained, subfolder="text_encoder_2", **weights
        ),
        CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kw),
        CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", **kw),
        zero_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
    )


FAMILY = TeacherFamily(
    "sdxl", load_prompt_encoder, sd.forward, pipelines=("StableDiffusionXL",),
    vae_overflows_in_fp16=True, lora_saver="StableDiffusionXLPipeline",
)  # fmt: skip
