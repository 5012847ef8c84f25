"""Callbacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from torchvision.utils import save_image


class ImageWriter(BasePredictionWriter):
    """Write each predicted image as ``<output_dir>/<input relative name>.png``."""

    def __init__(self, output_dir: str) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.written = 0

    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: dict[str, Any],
        batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        for image, name in zip(prediction["images"], prediction["names"], strict=True):
            path = self.output_dir / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image(image, path)
            self.written += 1

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            print(f"wrote {self.written} images to {self.output_dir}")
