"""LightningModules and their helpers."""

from .baseline import ControlNetBaseline
from .callbacks import ImageWriter, StepProgressBar
from .module import CoDiDistillation, NonFiniteTrainingError
from .teacher import DiffusionTraining

__all__ = [
    "CoDiDistillation",
    "NonFiniteTrainingError",
    "ControlNetBaseline",
    "DiffusionTraining",
    "ImageWriter",
    "StepProgressBar",
]
