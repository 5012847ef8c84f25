"""Stable Diffusion XL: two CLIP text encoders and size micro-conditioning (METHOD.md,
"Other teacher families"). Same VP math as SD; only the text side differs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..conditioning import Conditioning, ImageSizes, PromptEncoder, tokenize
from . import sd
from .base import TeacherFamily, UNetExport


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


def assemble_pipeline(parts: Any, controlnet: nn.Module, scheduler: Any) -> Any:
    """The stock ``StableDiffusionXLControlNetPipeline`` of loaded parts (the empty prompt
    as the folder says, no watermark)."""
    from diffusers import StableDiffusionXLControlNetPipeline

    text = parts.prompt_encoder
    return StableDiffusionXLControlNetPipeline(
        vae=parts.vae, text_encoder=text.text_encoder, text_encoder_2=text.text_encoder_2,
        tokenizer=text.tokenizer, tokenizer_2=text.tokenizer_2, unet=parts.network,
        controlnet=controlnet, scheduler=scheduler,
        force_zeros_for_empty_prompt=text.zero_empty_prompt, add_watermarker=False,
    )  # fmt: skip


def card(unet_config: Mapping[str, Any], zero_empty: bool) -> tuple[str, str, str]:
    """The model card's SDXL words, the snippet's text lines (zero embeddings for the
    empty prompt when the model saw it as zeros) and the call's prompt argument."""
    width = int(unet_config["cross_attention_dim"])
    pooled = int(unet_config["projection_class_embeddings_input_dim"]) - 6 * int(
        unet_config["addition_time_embed_dim"]
    )
    empty, zeros = "", ""
    if zero_empty:
        empty = """ The model saw an empty prompt as
zeros (SDXL's `force_zeros_for_empty_prompt`, which the pipeline applies only to its
negative prompt), so the snippet passes zero embeddings for `""`."""
        zeros = f"""
if prompt == "":  # zeros, as in training (not the encoded empty string)
    text = {{"prompt_embeds": torch.zeros(1, 77, {width}, dtype=pipe.dtype),
            "pooled_prompt_embeds": torch.zeros(1, {pooled}, dtype=pipe.dtype)}}"""
    words = f"""An SDXL model: the stock `StableDiffusionXLControlNetPipeline`. Its size conditioning
(`original_size`, `crops_coords_top_left`, `target_size`) defaults to original = target =
the output size and crop (0, 0), what `codi-lightning` samples with when a sample has no
recorded sizes; pass other values as you would to SDXL.{empty}

"""
    return words, '\ntext = {"prompt": prompt}' + zeros, "**text"


FAMILY = TeacherFamily(
    "sdxl", load_prompt_encoder, sd.forward, pipelines=("StableDiffusionXL",),
    vae_overflows_in_fp16=True, lora_saver="StableDiffusionXLPipeline",
    unet_export=UNetExport("StableDiffusionXLControlNetPipeline", "add_watermarker=False",
                           assemble_pipeline, card),
)  # fmt: skip
