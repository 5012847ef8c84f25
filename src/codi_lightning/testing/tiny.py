"""Tiny teacher folders for tests and benchmarks: named tiny network configurations and
writers of randomly initialised teachers in each family's diffusers layout, so tests go
through the same ``from_pretrained`` path users take with a real model.

The small offline text sides (tokenizers and text encoders) live with their families in
``models/teachers`` (fresh pixel-space teachers use them too) and are re-exported here.
Nothing outside this package imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..models.teachers.base import write_pipeline_folder
from ..models.teachers.sana import (
    SANA_SCHEDULER,
    TINY_SANA_TEXT_DIM,
    build_tiny_gemma_side,
    save_sana_folder,
)
from ..models.teachers.sd import (
    SD_SCHEDULER,
    build_tiny_text_encoder,
    build_tiny_tokenizer,
    save_teacher_folder,
    tiny_text_config,
)
from ..models.teachers.sd3 import (
    SD3_SCHEDULER,
    TINY_CLIP_G_PROJECTION,
    TINY_SD3_JOINT_DIM,
    TINY_SD3_T5_LENGTH,
    build_tiny_sd3_text_encoders,
    build_tiny_sd3_text_side,
    build_tiny_t5_tokenizer,
    save_sd3_folder,
)

__all__ = [  # re-exported from the families
    "SANA_SCHEDULER",
    "SD3_SCHEDULER",
    "SD_SCHEDULER",
    "TINY_SANA_TEXT_DIM",
    "TINY_SD3_JOINT_DIM",
    "TINY_SD3_T5_LENGTH",
    "build_tiny_gemma_side",
    "build_tiny_sd3_text_encoders",
    "build_tiny_sd3_text_side",
    "build_tiny_t5_tokenizer",
    "build_tiny_text_encoder",
    "build_tiny_tokenizer",
    "save_sana_folder",
    "save_sd3_folder",
    "save_teacher_folder",
    "tiny_text_config",
    "write_pipeline_folder",
]


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


# SDXL's scheduler (EulerDiscreteScheduler config; the same VP betas as SD)
SDXL_SCHEDULER = {
    **SD_SCHEDULER,
    "_class_name": "EulerDiscreteScheduler",
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "sample_max_value": 1.0,
}
# model_index.json of an SDXL folder (StableDiffusionXLPipeline)
SDXL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "image_encoder": [None, None],
    "feature_extractor": [None, None],
    "force_zeros_for_empty_prompt": True,
}
TINY_SDXL_TEXT_WIDTHS = (32, 48)  # CLIP-L and CLIP-G stand-ins: y has 80 features
TINY_SDXL_POOLED = TINY_CLIP_G_PROJECTION  # projection_dim of the second encoder (text_embeds)
TINY_SDXL_TIME_EMBED = 8  # addition_time_embed_dim, per entry of time_ids


def tiny_sdxl_unet_config() -> dict[str, Any]:
    """The tiny UNet with SDXL's added conditioning (``addition_embed_type="text_time"``):
    cross-attention over the concatenated text widths, an added embedding over the
    pooled text and the six ``time_ids``."""
    return {
        **tiny_unet_config(cross_attention_dim=sum(TINY_SDXL_TEXT_WIDTHS)),
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": TINY_SDXL_TIME_EMBED,
        "projection_class_embeddings_input_dim": TINY_SDXL_POOLED + 6 * TINY_SDXL_TIME_EMBED,
    }


def build_tiny_sdxl_text_encoders(tokenizer, tokenizer_2):
    """CLIPTextModel (width 32) and CLIPTextModelWithProjection (width 48, pooled 40)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    first = CLIPTextModel(CLIPTextConfig(**tiny_text_config(len(tokenizer))))
    width = TINY_SDXL_TEXT_WIDTHS[1]
    config_2 = {
        **tiny_text_config(len(tokenizer_2)),
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "projection_dim": TINY_SDXL_POOLED,
    }
    return first, CLIPTextModelWithProjection(CLIPTextConfig(**config_2))


def write_tiny_sdxl_teacher(folder: str | Path, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny randomly initialised SDXL teacher in the diffusers SDXL layout
    (``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``,
    ``tokenizer_2/``, ``scheduler/``, and a ``model_index.json`` naming
    ``StableDiffusionXLPipeline``, which stock diffusers loads). The VAE has SDXL's
    ``scaling_factor`` 0.13025 and ``force_upcast``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = Path(folder)
    if (folder / "unet").exists() and not overwrite:
        return folder
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_tiny_tokenizer()
    text_encoder, text_encoder_2 = build_tiny_sdxl_text_encoders(tokenizer, tokenizer_2)
    unet = UNet2DConditionModel(**tiny_sdxl_unet_config())
    vae = AutoencoderKL(**tiny_vae_config(), scaling_factor=0.13025, force_upcast=True)
    parts = {
        "tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2, "unet": unet, "vae": vae,
    }  # fmt: skip
    return write_pipeline_folder(folder, parts, SDXL_SCHEDULER, SDXL_INDEX)


def tiny_sd3_transformer_config() -> dict[str, Any]:
    """SD3Transformer2DModel: 2 joint blocks of width 32 (4 heads of 8) on 16-channel
    latents in 2x2 patches; the pooled text is CLIP-L's and CLIP-G's projections (32 + 40)."""
    return {
        "sample_size": 8,
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 4,
        "joint_attention_dim": TINY_SD3_JOINT_DIM,
        "caption_projection_dim": 32,
        "pooled_projection_dim": 32 + TINY_SDXL_POOLED,
        "pos_embed_max_size": 32,
    }


def tiny_sd3_vae_config() -> dict[str, Any]:
    """The tiny VAE with SD3's 16 latent channels, shift and scale, no quant convs."""
    return {
        **tiny_vae_config(),
        "latent_channels": 16,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }


def write_tiny_sd3_teacher(folder: str | Path, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny randomly initialised SD3-family teacher in the diffusers SD3 layout
    (``transformer/``, ``vae/``, ``text_encoder{,_2,_3}/``, ``tokenizer{,_2,_3}/``,
    ``scheduler/`` and a ``model_index.json`` naming ``StableDiffusion3Pipeline``, which
    stock diffusers loads)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    folder = Path(folder)
    if (folder / "transformer").exists() and not overwrite:
        return folder
    torch.manual_seed(seed)
    tokenizers, encoders = build_tiny_sd3_text_side()
    transformer = SD3Transformer2DModel(**tiny_sd3_transformer_config())
    vae = AutoencoderKL(**tiny_sd3_vae_config())
    return save_sd3_folder(folder, transformer, encoders, tokenizers, SD3_SCHEDULER, vae)


# Flux.1's scheduler: rectified flow whose shift depends on the image size (mu from the
# number of image tokens, 0.5 at 256 tokens to 1.15 at 4096)
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                  "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256,
                  "max_image_seq_len": 4096}  # fmt: skip


def tiny_flux_transformer_config() -> dict[str, Any]:
    """FluxTransformer2DModel: one double- and one single-stream block of width 16 (2
    heads of 8, rotary axes 2 + 2 + 4) on 2x2-packed 16-channel latents (64 features a
    token); T5 width ``TINY_SD3_JOINT_DIM``, CLIP-L pooled width 32, a guidance embedding
    (as Flux-dev)."""
    return {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": TINY_SD3_JOINT_DIM,
        "pooled_projection_dim": 32,
        "guidance_embeds": True,
        "axes_dims_rope": (2, 2, 4),
    }


def tiny_flux_vae_config() -> dict[str, Any]:
    """The tiny 16-channel VAE with Flux.1's latent scale and shift."""
    return {**tiny_sd3_vae_config(), "scaling_factor": 0.3611, "shift_factor": 0.1159}


def write_tiny_flux_teacher(folder: str | Path, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny randomly initialised Flux teacher in the diffusers Flux layout
    (``transformer/``, ``vae/``, ``text_encoder/`` CLIP-L, ``text_encoder_2/`` T5, their
    tokenizers, ``scheduler/`` and a ``model_index.json`` naming ``FluxPipeline``, which
    stock diffusers loads)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    folder = Path(folder)
    if (folder / "transformer").exists() and not overwrite:
        return folder
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_tiny_t5_tokenizer()
    text_encoder = build_tiny_text_encoder(tokenizer)
    text_encoder_2 = build_tiny_sd3_text_encoders(tokenizer, tokenizer, tokenizer_2)[2]
    parts = {
        "transformer": FluxTransformer2DModel(**tiny_flux_transformer_config()),
        "vae": AutoencoderKL(**tiny_flux_vae_config()),
        "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer, "tokenizer_2": tokenizer_2,
    }  # fmt: skip
    index = {
        "_class_name": "FluxPipeline",
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
    }
    return write_pipeline_folder(folder, parts, FLUX_SCHEDULER, index)


def tiny_sana_transformer_config() -> dict[str, Any]:
    """SanaTransformer2DModel: 2 blocks of width 32 (2 heads of 16; cross-attention of the
    same width, as the caption projection requires) on 8-channel latents, 1x1 patches."""
    return {
        "in_channels": 8,
        "out_channels": 8,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "num_layers": 2,
        "num_cross_attention_heads": 2,
        "cross_attention_head_dim": 16,
        "cross_attention_dim": 32,
        "caption_channels": TINY_SANA_TEXT_DIM,
        "mlp_ratio": 2.5,
        "sample_size": 4,
        "patch_size": 1,
    }


def tiny_sana_vae_config() -> dict[str, Any]:
    """AutoencoderDC of 4 ResBlock stages: 32 px images -> 4x4x8 latents, 8 pixels a latent
    as the other tiny VAEs (SANA's DC-AE compresses 32x into 32 channels), SANA's scaling
    factor."""
    return {
        "in_channels": 3,
        "latent_channels": 8,
        "attention_head_dim": 8,
        "encoder_block_types": "ResBlock",
        "decoder_block_types": "ResBlock",
        "encoder_block_out_channels": (8, 8, 16, 16),
        "decoder_block_out_channels": (8, 8, 16, 16),
        "encoder_layers_per_block": (1, 1, 1, 1),
        "decoder_layers_per_block": (1, 1, 1, 1),
        "encoder_qkv_multiscales": ((), (), (), ()),
        "decoder_qkv_multiscales": ((), (), (), ()),
        "upsample_block_type": "pixel_shuffle",
        "downsample_block_type": "pixel_unshuffle",
        "decoder_norm_types": "rms_norm",
        "decoder_act_fns": "silu",
        "scaling_factor": 0.41407,
    }


def write_tiny_sana_teacher(folder: str | Path, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a tiny randomly initialised SANA teacher in the diffusers SANA layout
    (``transformer/``, ``vae/`` (AutoencoderDC), ``text_encoder/`` (Gemma 2),
    ``tokenizer/``, ``scheduler/`` as SANA ships it and a ``model_index.json`` naming
    ``SanaPipeline``, which stock diffusers loads)."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel

    folder = Path(folder)
    if (folder / "transformer").exists() and not overwrite:
        return folder
    torch.manual_seed(seed)
    tokenizer, text_encoder = build_tiny_gemma_side()
    transformer = SanaTransformer2DModel(**tiny_sana_transformer_config())
    vae = AutoencoderDC(**tiny_sana_vae_config())
    return save_sana_folder(folder, transformer, text_encoder, tokenizer, SANA_SCHEDULER, vae)
