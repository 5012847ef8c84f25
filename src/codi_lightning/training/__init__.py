"""LightningModules and their helpers."""

from .baseline import ControlNetBaseline
from .callbacks import ImageWriter, StepProgressBar
from .module import CoDiDistillation
from .teacher import DiffusionTraining

__all__ = [
    "CoDiDistillation",
    "ControlNetBaseline",
    "DiffusionTraining",
    "ImageWriter",
    "StepProgressBar",
]
