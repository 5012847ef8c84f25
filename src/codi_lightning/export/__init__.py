"""Export to diffusers folders and sample from them."""

from .exporter import export_checkpoint
from .pipeline import CoDiPipeline

__all__ = ["CoDiPipeline", "export_checkpoint"]
