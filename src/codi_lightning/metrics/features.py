"""Feature networks for FID/KID."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class InceptionFeatures(nn.Module):
    """torch-fidelity's FID Inception-v3 (2048-d pool features), images in [0, 1]."""

    num_features = 2048

    def __init__(self, weights_path: str | None = None) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=weights_path,
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.net((images.clamp(0, 1) * 255).round().to(torch.uint8)).reshape(len(images), -1)


class RandomConvFeatures(nn.Module):
    """A fixed, randomly initialised conv net (seeded, no weights to download).

    Three stride-2 3x3 convolutions with ReLU, then per-channel mean and standard
    deviation: 2 x 128 = 256 features, images in [0, 1] of any size >= 8 px. Random
    convolutional features are a known stand-in for learned ones in distribution
    distances (they separate textures and colour statistics); absolute values are not
    comparable with Inception FID, rankings between models are what they are for.
    """

    num_features = 256

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
                for c_in, c_out in ((3, 32), (32, 64), (64, 128))
            ]
        )
        with torch.no_grad():
            for conv in self.convs:
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(
                    torch.randn(conv.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5
                )
                conv.bias.zero_()
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> RandomConvFeatures:
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        h = images.float() * 2 - 1
        for conv in self.convs:
            h = torch.relu(conv(h))
        return torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3))], dim=1)
