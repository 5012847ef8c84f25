"""Builders for the teacher parts and the condition adapter (tiny teacher folders for
tests: ``codi_lightning.testing.tiny``)."""

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

__all__ = [
    "Conditioning",
    "ImageSizes",
    "PromptEncoder",
    "TeacherParts",
    "adapter_cond_channels",
    "build_adapter",
    "build_family_adapter",
    "check_condition_downsampling",
    "check_resolution",
    "load_teacher",
    "network_multiple",
    "vae_tiles",
]
