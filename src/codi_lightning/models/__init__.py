"""Builders for the teacher parts and the condition adapter, and tiny configurations."""

from .builders import (
    TeacherParts,
    adapter_cond_channels,
    build_adapter,
    check_condition_downsampling,
    check_resolution,
    load_teacher,
)
from .tiny import build_tiny_tokenizer, write_tiny_teacher

__all__ = [
    "TeacherParts",
    "adapter_cond_channels",
    "build_adapter",
    "build_tiny_tokenizer",
    "check_condition_downsampling",
    "check_resolution",
    "load_teacher",
    "write_tiny_teacher",
]
