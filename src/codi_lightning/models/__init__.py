"""Builders for the teacher parts and the condition adapter, and tiny configurations."""

from .builders import (
    TeacherParts,
    adapter_cond_channels,
    build_adapter,
    build_family_adapter,
    check_condition_downsampling,
    check_resolution,
    load_teacher,
    network_multiple,
    vae_tiles,
)
from .conditioning import Conditioning, ImageSizes, PromptEncoder
from .tiny import (
    build_tiny_text_encoder,
    build_tiny_tokenizer,
    save_teacher_folder,
    write_tiny_flux_teacher,
    write_tiny_sana_teacher,
    write_tiny_sd3_teacher,
    write_tiny_sdxl_teacher,
    write_tiny_teacher,
)

__all__ = [
    "Conditioning",
    "ImageSizes",
    "PromptEncoder",
    "TeacherParts",
    "adapter_cond_channels",
    "build_adapter",
    "build_family_adapter",
    "build_tiny_text_encoder",
    "build_tiny_tokenizer",
    "check_condition_downsampling",
    "check_resolution",
    "load_teacher",
    "network_multiple",
    "vae_tiles",
    "save_teacher_folder",
    "write_tiny_flux_teacher",
    "write_tiny_sana_teacher",
    "write_tiny_sd3_teacher",
    "write_tiny_sdxl_teacher",
    "write_tiny_teacher",
]
