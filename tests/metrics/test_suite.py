"""Evaluation metrics: values against torchmetrics' functional forms, weight wiring."""

import json
import time

import pytest
import torch
from torch import nn
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from codi_lightning.metrics import EvalSuite, MetricsConfig, MissingWeightsError, write_results
from codi_lightning.metrics import suite as suite_mod
from codi_lightning.metrics import weights as weights_mod
from codi_lightning.metrics.suite import downscale

OFFLINE = dict(feature="random_conv", lpips=False, kid_subset_size=4)


def _images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g)


def test_suite_values_match_functional_metrics():
    target, preds = _images(seed=0), _images(seed=1)
    suite = EvalSuite(MetricsConfig(**OFFLINE, input_consistency_factor=4), [1, 4])
    suite.update(1, target.clone(), target)
    suite.update(4, preds, target)
    res = suite.compute()
    assert res[4]["images"] == 6 and res[1]["images"] == 6
    assert res[4]["psnr"] == pytest.approx(
        peak_signal_noise_ratio(preds, target, data_range=1.0).item(), rel=1e-5
    )
    assert res[4]["ssim"] == pytest.approx(
        structural_similarity_index_measure(preds, target, data_range=1.0).item(), rel=1e-5
    )
    expected = peak_signal_noise_ratio(downscale(preds, 4), downscale(target, 4), data_range=1.0)
    assert res[4]["input_psnr"] == pytest.approx(expected.item(), rel=1e-5)
    assert res[1]["ssim"] == pytest.approx(1.0) and res[1]["psnr"] == float("inf")
    assert abs(res[1]["fid"]) < 1e-3 and res[4]["fid"] > 1e-2  # identical sets score 0
    suite.reset()
    suite.update(1, preds, target)
    assert suite.compute()[1]["images"] == 6


def test_results_files(tmp_path):
    res = {1: {"fid": 1.5, "psnr": 20.0, "images": 8}, 4: {"fid": 1.0, "psnr": 22.0, "images": 8}}
    json_path, md_path = write_results(res, tmp_path, {"weights": "target"})
    assert json.loads(json_path.read_text())["results"]["4"]["psnr"] == 22.0
    md = md_path.read_text()
    assert "| steps | fid ↓ | psnr ↑ | images |" in md and "| 4 | 1.0000 | 22.0000 | 8 |" in md


def test_missing_weights_fail_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(weights_mod, "reachable", lambda host, timeout=3.0: False)
    start = time.monotonic()
    with pytest.raises(
        MissingWeightsError, match=r"weights-inception-2015-12-05-6726825d\.pth.*hub"
    ):
        EvalSuite(MetricsConfig(lpips=False), [1])
    with pytest.raises(MissingWeightsError, match=r"alexnet-owt-7be5be79\.pth"):
        EvalSuite(MetricsConfig(feature="random_conv", fid=False, kid=False), [1])
    with pytest.raises(MissingWeightsError, match="no such file"):
        EvalSuite(MetricsConfig(inception_weights=str(tmp_path / "nope.pth"), lpips=False), [1])
    assert time.monotonic() - start < 10


def test_inception_weights_path_reaches_the_extractor(tmp_path, monkeypatch):
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"stand-in")
    seen = {}

    class Fake(nn.Module):
        num_features = 8

        def __init__(self, path):
            super().__init__()
            seen["path"] = path

        def forward(self, x):
            return x.mean(dim=(2, 3)).repeat(1, 3)[:, :8] if x.shape[1] == 3 else x

    monkeypatch.setattr(suite_mod, "InceptionFeatures", Fake)
    EvalSuite(MetricsConfig(inception_weights=str(weights), lpips=False, kid=False), [1])
    assert seen["path"] == str(weights)


def test_lpips_with_local_backbone_weights(tmp_path):
    """The real LPIPS wiring with a local stand-in for the AlexNet weights file."""
    import torchvision

    path = tmp_path / "my_alexnet.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    suite = EvalSuite(MetricsConfig(fid=False, kid=False, lpips_weights=str(path)), [2])
    target, preds = _images(4, 0), _images(4, 1)
    suite.update(2, preds, target)
    suite.update(2, target.clone(), target)
    value = suite.compute()[2]["lpips"]
    assert 0 < value < 1


def _tiny_clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from codi_lightning.testing.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder


def test_clip_score_with_local_model(tmp_path):
    folder = _tiny_clip(tmp_path / "clip")
    suite = EvalSuite(
        MetricsConfig(fid=False, kid=False, lpips=False, clip=True, clip_model=str(folder)), [1]
    )
    preds, captions = _images(2), ["a red circle", "a blue square"]
    suite.update(1, preds, _images(2, 1), captions)
    score = suite.compute()[1]["clip"]
    # the same number computed by hand with the same model: 100 * max(cos(image, text), 0)
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    pixels = proc(images=list((preds * 255).round().to(torch.uint8)), return_tensors="pt")[
        "pixel_values"
    ]
    text = proc(text=captions, return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.get_text_features(**text).pooler_output
    cos = torch.nn.functional.cosine_similarity(img, txt)
    assert score == pytest.approx((100 * cos).clamp(min=0).mean().item(), abs=1e-3)


def test_missing_clip_model_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(suite_mod, "reachable", lambda host, timeout=3.0: False)
    with pytest.raises(MissingWeightsError, match="clip_model"):
        EvalSuite(
            MetricsConfig(**OFFLINE, clip=True, clip_model="openai/clip-vit-large-patch14"), [1]
        )


def test_swd_separates_distributions_and_is_zero_for_identical_sets():
    from codi_lightning.metrics.swd import SlicedWassersteinDistance, laplacian_pyramid

    img = _images(48, 0)
    pyr = laplacian_pyramid(img, 3)
    assert [p.shape[-1] for p in pyr] == [32, 16, 8]
    same = SlicedWassersteinDistance(seed=1)
    same.update(img, real=True)
    same.update(img.clone(), real=False)
    # identical images, but different random patch positions: small, not exactly 0
    close = float(same.compute())
    blurred = torch.nn.functional.avg_pool2d(img, 3, stride=1, padding=1)
    far = SlicedWassersteinDistance(seed=1)
    far.update(img, real=True)
    far.update(blurred, real=False)
    assert float(far.compute()) > 2 * close
    suite = EvalSuite(MetricsConfig(**OFFLINE, swd=True), [1])
    suite.update(1, blurred, img)
    assert suite.compute()[1]["swd"] > 0


def test_kid_is_shown_with_its_spread_and_what_a_negative_value_means():
    from codi_lightning.metrics.suite import results_markdown

    rows = {1: {"fid": 3.0, "kid": -0.1602, "kid_std": 0.1201, "images": 128},
            4: {"fid": 2.0, "kid": 0.0478, "kid_std": 0.1557, "images": 128}}  # fmt: skip
    table = results_markdown(rows)
    header = table.splitlines()[0]
    assert "kid (± std) ↓" in header and "kid_std" not in header
    assert "| 1 | 3.0000 | -0.1602 ± 0.12 | 128 |" in table
    assert "falls below 0 by chance" in table
    plain = results_markdown({1: {"fid": 3.0, "images": 8}})
    assert "KID" not in plain
