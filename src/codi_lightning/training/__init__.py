"""LightningModules and their helpers."""

from .callbacks import ImageWriter
from .module import CoDiDistillation

__all__ = ["CoDiDistillation", "ImageWriter"]
