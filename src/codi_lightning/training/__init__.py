"""LightningModules and their helpers."""

from .baseline import ControlNetBaseline
from .callbacks import ImageWriter, StepProgressBar
from .checkpointing import StreamedCheckpointIO
from .module import CoDiDistillation
from .teacher import DiffusionTraining
from .updates import NonFiniteTrainingError

__all__ = [
    "CoDiDistillation",
    "NonFiniteTrainingError",
    "ControlNetBaseline",
    "DiffusionTraining",
    "ImageWriter",
    "StepProgressBar",
    "StreamedCheckpointIO",
]
