"""Named tiny configurations and a writer for a tiny diffusers teacher folder.

The tiny teacher has the same layout as a Stable Diffusion folder (``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``), so tests and the demo go through the
same ``from_pretrained`` path users take with a real model. Weights are random unless a
trained teacher is written over them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

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


def tiny_unet_config(in_channels: int = 4, cross_attention_dim: int = 32) -> dict[str, Any]:
    """UNet2DConditionModel with block widths (32, 64); cross-attention only at the lowest
    resolution (attention at high resolution dominates CPU time)."""
    return {
        "sample_size": 8,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }


def tiny_vae_config() -> dict[str, Any]:
    """AutoencoderKL with 3 blocks: downsamples by 4 (32 px image -> 8x8x4 latent)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (16, 32, 32),
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 32,
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


def save_teacher_folder(
    folder: str | Path,
    unet,
    text_encoder,
    tokenizer,
    scheduler_config: dict[str, Any],
    vae=None,
) -> Path:
    """Write teacher parts in the Stable Diffusion folder layout (safetensors) with a
    ``model_index.json``, so ``load_teacher`` and diffusers pipelines can read it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    text_encoder.save_pretrained(folder / "text_encoder")
    unet.save_pretrained(folder / "unet")
    components: dict[str, Any] = {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    if vae is not None:
        vae.save_pretrained(folder / "vae")
        components["vae"] = ["diffusers", "AutoencoderKL"]
        components |= {"safety_checker": [None, None], "feature_extractor": [None, None]}
        components["requires_safety_checker"] = False
    (folder / "scheduler").mkdir(exist_ok=True)
    config = {"_class_name": "DDPMScheduler", **dict(scheduler_config)}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
    index = {"_class_name": "StableDiffusionPipeline", **components}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def build_tiny_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**tiny_text_config(len(tokenizer))))


def write_tiny_teacher(
    folder: str | Path,
    *,
    pixel_space: bool = False,
    prediction_type: str = "epsilon",
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a tiny randomly initialised teacher in diffusers layout and return its path.

    ``pixel_space=True`` writes no ``vae/`` and a 3-channel UNet that works on images in
    [-1, 1] directly.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = Path(folder)
    if (folder / "unet").exists() and not overwrite:
        return folder
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    text_encoder = build_tiny_text_encoder(tokenizer)
    unet = UNet2DConditionModel(**tiny_unet_config(in_channels=3 if pixel_space else 4))
    vae = None if pixel_space else AutoencoderKL(**tiny_vae_config())
    scheduler = {**SD_SCHEDULER, "prediction_type": prediction_type}
    return save_teacher_folder(folder, unet, text_encoder, tokenizer, scheduler, vae)
