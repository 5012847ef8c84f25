"""CoDi: Conditional Diffusion Distillation (Mei et al., CVPR 2024) for PyTorch Lightning."""

__version__ = "0.1.0"
