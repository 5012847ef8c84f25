"""LightningModules and their helpers."""

from .module import CoDiDistillation

__all__ = ["CoDiDistillation"]
