"""Per-image features for a bootstrap over the test images, and the second classifier's
FID column (``fid_res``)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchmetrics.image import FrechetInceptionDistance

from codi_lightning.metrics import (
    DigitsResNet,
    EvalSuite,
    MetricsConfig,
    MissingWeightsError,
    RandomConvFeatures,
    frechet_distance,
)


def _images(seed: int, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(n, 3, 32, 32, generator=g)
    preds = (target + 0.3 * torch.randn(n, 3, 32, 32, generator=g)).clamp(0, 1)
    return preds, target


def test_frechet_distance_of_features_equals_torchmetrics_fid():
    """The FID of stored features (used for bootstrap subsets) against torchmetrics'
    FrechetInceptionDistance over the same images and feature network."""
    preds, target = _images(0, 40)
    net = RandomConvFeatures()
    fid = FrechetInceptionDistance(feature=net, normalize=True)
    fid.update(target, real=True)
    fid.update(preds, real=False)
    with torch.no_grad():
        ours = frechet_distance(net(target), net(preds))
    assert ours == pytest.approx(float(fid.compute()), rel=1e-4)
    assert frechet_distance(net(target), net(target)) == pytest.approx(0.0, abs=1e-6)


def _resnet_weights(tmp_path) -> str:
    torch.manual_seed(0)
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in DigitsResNet().state_dict().items()}, str(path))
    return str(path)


def test_suite_keeps_every_images_features_in_order_and_adds_fid_res(tmp_path):
    weights = _resnet_weights(tmp_path)
    config = MetricsConfig(feature="random_conv", lpips=False, kid=False, ssim=False,
                           psnr=False, resnet_classifier_weights=weights,
                           save_features=True)  # fmt: skip
    suite = EvalSuite(config, [2])
    batches = [_images(seed, 8) for seed in range(3)]
    for preds, target in batches:
        suite.update(2, preds, target)
    results = suite.compute()[2]
    stored = suite.features()[2]
    assert set(stored) == {"fid", "fid_res"}
    target = torch.cat([t for _, t in batches])
    preds = torch.cat([p for p, _ in batches])
    with torch.no_grad():
        resnet = DigitsResNet()
        resnet.load_state_dict(load_file(weights))
        assert torch.allclose(stored["fid"]["real"], RandomConvFeatures()(target), atol=1e-5)
        assert torch.allclose(stored["fid_res"]["fake"], resnet.features(preds), atol=1e-5)
    for name in ("fid", "fid_res"):  # FID recomputed from the stored rows
        again = frechet_distance(stored[name]["real"], stored[name]["fake"])
        assert again == pytest.approx(results[name], rel=1e-4)
    assert "features" not in results and results["images"] == 24


def test_a_missing_second_classifier_names_the_fix(tmp_path):
    config = MetricsConfig(feature="random_conv", lpips=False,
                           resnet_classifier_weights=str(tmp_path / "nope.safetensors"))  # fmt: skip
    with pytest.raises(MissingWeightsError, match="--architecture resnet"):
        EvalSuite(config, [1])
