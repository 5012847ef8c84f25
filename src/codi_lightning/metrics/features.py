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


class DigitsClassifier(nn.Module):
    """A small CNN for 32x32 digit images (bench/digits_classifier.py trains it).

    Input: [B, 3, H, W] in [0, 1] (resized to 32 px if needed; the channels are averaged,
    the digits are grey). Three conv stages (32, 64, 128 channels, 2x2 max-pool each) to
    4x4x128, then a 128-unit ReLU layer (the penultimate layer, :meth:`features`) and
    the 10-way linear head (:meth:`forward` returns logits).
    """

    num_features = 128
    num_classes = 10

    def __init__(self) -> None:
        super().__init__()

        def stage(c_in: int, c_out: int, convs: int) -> list[nn.Module]:
            layers: list[nn.Module] = []
            for i in range(convs):
                layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1), nn.ReLU()]
            return [*layers, nn.MaxPool2d(2)]

        self.body = nn.Sequential(*stage(1, 32, 2), *stage(32, 64, 2), *stage(64, 128, 1))
        self.penultimate = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, 128), nn.ReLU())
        self.head = nn.Linear(128, self.num_classes)

    def features(self, images: Tensor) -> Tensor:
        h = images.float().mean(dim=1, keepdim=True)
        if h.shape[-1] != 32 or h.shape[-2] != 32:
            h = torch.nn.functional.interpolate(h, size=(32, 32), mode="bilinear", antialias=True)
        return self.penultimate(self.body(h * 2 - 1))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


class _Residual(nn.Module):
    """Two 3x3 convolutions with group norm, added to the input (a 1x1 projection and a
    stride where the width or size changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.GroupNorm(8, c_out), nn.SiLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.GroupNorm(8, c_out),
        )  # fmt: skip
        self.skip = (
            nn.Identity() if c_in == c_out and stride == 1
            else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.silu(self.body(x) + self.skip(x))


class DigitsResNet(nn.Module):
    """A second digit classifier of another architecture, for a second FID column
    (bench/digits_classifier.py --architecture resnet trains it).

    Where :class:`DigitsClassifier` is a plain VGG-style stack with max-pooling and a
    fully connected penultimate layer over the 4x4 map, this is a residual network:
    a stem conv, three residual stages (24, 48, 96 channels; strided convolutions
    instead of pooling; group norm, SiLU), global average pooling to 96 values and a
    96-unit layer (the penultimate layer, :meth:`features`) before the 10-way head.
    """

    num_features = 96
    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 24, 3, padding=1), nn.GroupNorm(8, 24), nn.SiLU())
        self.stages = nn.Sequential(
            _Residual(24, 24, 1), _Residual(24, 48, 2), _Residual(48, 96, 2), _Residual(96, 96, 2)
        )
        self.penultimate = nn.Sequential(nn.Linear(96, 96), nn.SiLU())
        self.head = nn.Linear(96, self.num_classes)

    def features(self, images: Tensor) -> Tensor:
        h = images.float().mean(dim=1, keepdim=True)
        if h.shape[-1] != 32 or h.shape[-2] != 32:
            h = torch.nn.functional.interpolate(h, size=(32, 32), mode="bilinear", antialias=True)
        h = self.stages(self.stem(h * 2 - 1))
        return self.penultimate(h.mean(dim=(2, 3)))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


ARCHITECTURES = {"vgg": DigitsClassifier, "resnet": DigitsResNet}


class ClassifierFeatures(nn.Module):
    """FID/KID features from a trained classifier: the penultimate layer of
    :class:`DigitsClassifier` (``architecture="vgg"``, 128 values) or
    :class:`DigitsResNet` (``"resnet"``, 96 values) loaded from ``weights_path``
    (safetensors), images in [0, 1]. :meth:`predict` gives the classifier's class, for
    class consistency."""

    def __init__(self, weights_path: str, architecture: str = "vgg") -> None:
        super().__init__()
        from safetensors.torch import load_file

        self.net = ARCHITECTURES[architecture]()
        self.net.load_state_dict(load_file(str(weights_path)))
        self.num_features = self.net.num_features
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> ClassifierFeatures:
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        return self.net.features(images)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        return self.net(images).argmax(dim=1)
