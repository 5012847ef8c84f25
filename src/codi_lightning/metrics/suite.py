"""FID, KID, LPIPS, PSNR, SSIM, CLIP score and input-consistency PSNR per step count.

Tensors in, numbers out: images are [B, 3, H, W] in [0, 1]. Every metric is a
torchmetrics ``Metric``, so states are reduced across processes in ``compute`` (every
rank must call it). The feature network of FID/KID and the CLIP model are built once
and shared by the per-step-count metrics.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image import FrechetInceptionDistance

from ..compat import metric_defaults
from .features import ClassifierFeatures, InceptionFeatures, RandomConvFeatures
from .swd import SlicedWassersteinDistance
from .weights import (
    INCEPTION_URL,
    LPIPS_BACKBONE_URLS,
    MissingWeightsError,
    hub_dir_holding,
    reachable,
    resolve_weights,
)


@dataclass(frozen=True)
class MetricsConfig:
    """Which metrics ``codi-lightning test`` computes, and where their weights are.

    Attributes:
        fid, kid, lpips, psnr, ssim: turn each metric on or off.
        clip: CLIP score of the output against the caption (text-conditioned tasks).
        input_consistency_factor: for super-resolution, the factor f of the PSNR between
            the output and the target both downscaled by f (agreement with the input).
        feature: FID/KID features: ``inception`` (torch-fidelity's, the standard),
            ``random_conv`` (a fixed seeded conv net that needs no weights) or
            ``classifier`` (the penultimate layer of a trained digit classifier,
            ``classifier_weights``; also turns on ``class_consistency``).
        classifier_weights: safetensors of :class:`DigitsClassifier`
            (bench/digits_classifier.py), for ``feature: classifier``.
        fid_random_conv: also report FID over the random conv net as ``fid_rc`` (a
            secondary column next to classifier or Inception FID).
        inception_weights: local ``weights-inception-2015-12-05-6726825d.pth``.
        lpips_net: LPIPS backbone (``alex`` is the standard).
        lpips_weights: local torchvision weights of that backbone
            (e.g. ``alexnet-owt-7be5be79.pth``).
        clip_model: hub id or local folder of a CLIP model.
        kid_subset_size: KID subset size (lowered to the number of images if larger).
        swd: sliced Wasserstein distance over Laplacian-pyramid patches (x 1e3; needs
            no weights; images of at least 28 px for 3 levels).
        resnet_classifier_weights: safetensors of :class:`DigitsResNet`
            (``bench/digits_classifier.py --architecture resnet``): adds ``fid_res``, FID
            over a second feature network of another architecture.
        save_features: keep every test image's features (targets and outputs, in order)
            for FID and ``fid_res``; ``codi-lightning test`` writes them to
            ``test_features.pt`` for a bootstrap over the test images
            (:func:`frechet_distance` recomputes FID from them).

    With ``feature: classifier`` the suite also reports ``class_consistency``: the share
    of outputs the classifier puts in the class it predicts for the ground-truth image
    (its prediction on the ground truth stands in for the label, which the test batch
    does not carry).
    """

    fid: bool = True
    kid: bool = True
    lpips: bool = True
    psnr: bool = True
    ssim: bool = True
    clip: bool = False
    input_consistency_factor: int | None = None
    feature: Literal["inception", "random_conv", "classifier"] = "inception"
    inception_weights: str | None = None
    classifier_weights: str | None = None
    fid_random_conv: bool = False
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex"
    lpips_weights: str | None = None
    clip_model: str = "openai/clip-vit-large-patch14"
    kid_subset_size: int = 100
    swd: bool = False
    resnet_classifier_weights: str | None = None
    save_features: bool = False


class _ClipImageText(nn.Module):
    """Adapts transformers 5's CLIPModel (feature getters return output objects) to the
    tensor-returning interface torchmetrics' CLIPScore calls."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config  # CLIPScore reads text_config.max_position_embeddings

    def get_image_features(self, *args, **kwargs) -> Tensor:
        out = self.model.get_image_features(*args, **kwargs)
        return out if isinstance(out, Tensor) else out.pooler_output

    def get_text_features(self, *args, **kwargs) -> Tensor:
        out = self.model.get_text_features(*args, **kwargs)
        return out if isinstance(out, Tensor) else out.pooler_output


def clip_loader(name: str) -> Callable[[], tuple[nn.Module, object]]:
    """A loader for CLIPScore: local files first; the hub only if it can be reached."""

    def load() -> tuple[nn.Module, object]:
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(name, local_files_only=True)
            processor = CLIPProcessor.from_pretrained(name, local_files_only=True)
        except OSError:
            if Path(name).exists() or not reachable("huggingface.co"):
                raise MissingWeightsError(
                    f"CLIP model {name!r} is neither a local folder nor in the Hugging Face "
                    "cache, and the hub cannot be reached. Download it (e.g. `huggingface-cli "
                    f"download {name}`) or set model.metrics.clip_model=/path/to/clip_folder."
                ) from None
            model = CLIPModel.from_pretrained(name)
            processor = CLIPProcessor.from_pretrained(name)
        return _ClipImageText(model.eval()), processor

    return load


def build_lpips(net: str, weights: str | None) -> nn.Module:
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    url = LPIPS_BACKBONE_URLS[net]
    path = resolve_weights("LPIPS backbone", url, weights, "model.metrics.lpips_weights")
    if path is None:
        return LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True)
    with hub_dir_holding(path, url):
        return LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True)


def build_feature(config: MetricsConfig) -> nn.Module:
    if config.feature == "random_conv":
        return RandomConvFeatures()
    if config.feature == "classifier":
        if not config.classifier_weights or not Path(config.classifier_weights).is_file():
            raise MissingWeightsError(
                "metrics.feature: classifier needs model.metrics.classifier_weights, the "
                f"classifier's safetensors (got {config.classifier_weights!r}); train one with "
                "bench/digits_classifier.py"
            )
        return ClassifierFeatures(config.classifier_weights)
    path = resolve_weights(
        "FID Inception", INCEPTION_URL, config.inception_weights, "model.metrics.inception_weights"
    )
    return InceptionFeatures(None if path is None else str(path))


def build_resnet_feature(config: MetricsConfig) -> nn.Module | None:
    """The second classifier's features (``fid_res``), or None when not configured."""
    weights = config.resnet_classifier_weights
    if weights is None:
        return None
    if not Path(weights).is_file():
        raise MissingWeightsError(
            f"model.metrics.resnet_classifier_weights: no file at {weights!r}; train the "
            "second classifier with `python bench/digits_classifier.py --architecture resnet`"
            " or leave the option out"
        )
    return ClassifierFeatures(weights, "resnet")


def downscale(images: Tensor, factor: int) -> Tensor:
    return F.interpolate(
        images, scale_factor=1 / factor, mode="bicubic", antialias=True, align_corners=False
    ).clamp(0, 1)


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """FID from two sets of features [N, D]: |mu_r - mu_f|^2 + tr(S_r) + tr(S_f)
    - 2 tr((S_r S_f)^(1/2)), with unbiased covariances and the trace of the square root
    as the sum of the square roots of the eigenvalues of S_r S_f (float64). The same
    quantity torchmetrics' FID computes from its running sums, here for subsets of stored
    features (a bootstrap over the test images)."""
    real, fake = real.double(), fake.double()
    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = torch.cov(real.T), torch.cov(fake.T)
    root = torch.linalg.eigvals(cov_r @ cov_f).sqrt().real.sum()
    return float((mu_r - mu_f).square().sum() + cov_r.trace() + cov_f.trace() - 2 * root)


class FeatureStore(Metric):
    """Every target's and output's features, in update order: row i of ``real`` and of
    ``fake`` belong to the same test image, so runs tested on the same images in the same
    order can be resampled together (a paired bootstrap). ``compute`` gathers all ranks'
    rows (rank by rank)."""

    full_state_update = False

    def __init__(self, feature: nn.Module, **kwargs) -> None:
        super().__init__(**kwargs)
        self.feature = feature
        self.add_state("real", [], dist_reduce_fx="cat")
        self.add_state("fake", [], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.real.append(self.feature(target).float())
        self.fake.append(self.feature(preds).float())

    def compute(self) -> dict[str, Tensor]:
        def rows(value: list[Tensor] | Tensor) -> Tensor:
            if isinstance(value, list):  # not synced (one process) or nothing seen
                return torch.cat(value) if value else torch.empty(0)
            return value

        return {"real": rows(self.real).cpu(), "fake": rows(self.fake).cpu()}


class ClassConsistency(Metric):
    """Share of ``preds`` that ``classifier.predict`` puts in the class it predicts for
    ``target`` (the classifier's prediction on the ground truth stands in for its label)."""

    higher_is_better = True

    def __init__(self, classifier: ClassifierFeatures, **kwargs) -> None:
        super().__init__(**kwargs)
        self.classifier = classifier
        self.add_state("agree", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        same = self.classifier.predict(preds) == self.classifier.predict(target)
        self.agree += same.sum().float()
        self.total += same.numel()

    def compute(self) -> Tensor:
        return self.agree / self.total


class EvalSuite(nn.Module):
    """One set of metrics per step count, updated with samples and targets."""

    def __init__(self, config: MetricsConfig, step_counts: Sequence[int]) -> None:
        super().__init__()
        from torchmetrics.aggregation import SumMetric
        from torchmetrics.image import (
            FrechetInceptionDistance,
            KernelInceptionDistance,
            PeakSignalNoiseRatio,
            StructuralSimilarityIndexMeasure,
        )
        from torchmetrics.multimodal import CLIPScore

        self.config = config
        self.step_counts = [int(s) for s in step_counts]
        use_classifier = config.feature == "classifier"
        feature = build_feature(config) if (config.fid or config.kid or use_classifier) else None
        random_conv = RandomConvFeatures() if config.fid_random_conv else None
        resnet = build_resnet_feature(config)
        clip = clip_loader(config.clip_model)() if config.clip else None
        groups = {}
        for steps in self.step_counts:
            group: dict[str, nn.Module] = {"images": SumMetric()}
            if config.fid:
                group["fid"] = FrechetInceptionDistance(feature=feature, normalize=True)
            if random_conv is not None:
                group["fid_rc"] = FrechetInceptionDistance(feature=random_conv, normalize=True)
            if resnet is not None:
                group["fid_res"] = FrechetInceptionDistance(feature=resnet, normalize=True)
            if config.save_features and config.fid:
                group["features"] = FeatureStore(feature)
                if resnet is not None:
                    group["features_res"] = FeatureStore(resnet)
            if config.kid:
                group["kid"] = KernelInceptionDistance(
                    feature=feature, normalize=True, subset_size=config.kid_subset_size
                )
            if use_classifier:
                group["class_consistency"] = ClassConsistency(feature)
            if config.lpips:
                group["lpips"] = build_lpips(config.lpips_net, config.lpips_weights)
            if config.psnr:
                group["psnr"] = PeakSignalNoiseRatio(data_range=1.0)
            if config.ssim:
                group["ssim"] = StructuralSimilarityIndexMeasure(data_range=1.0)
            if config.swd:
                group["swd"] = SlicedWassersteinDistance()
            if config.input_consistency_factor:
                group["input_psnr"] = PeakSignalNoiseRatio(data_range=1.0)
            if clip is not None:
                group["clip"] = CLIPScore(model_name_or_path=lambda c=clip: c)
            groups[str(steps)] = nn.ModuleDict(group)
        self.groups = nn.ModuleDict(groups)

    @torch.no_grad()
    def update(
        self, steps: int, preds: Tensor, target: Tensor, captions: Sequence[str] | None = None
    ) -> None:
        """Add a batch of samples ``preds`` made in ``steps`` steps and their ``target``."""
        g = self.groups[str(steps)]
        preds, target = preds.float().clamp(0, 1), target.float().clamp(0, 1)
        g["images"].update(torch.tensor(float(len(preds)), device=preds.device))
        if "fid" in g:
            g["fid"].update(target, real=True)
            g["fid"].update(preds, real=False)
        if "fid_rc" in g:
            g["fid_rc"].update(target, real=True)
            g["fid_rc"].update(preds, real=False)
        if "fid_res" in g:
            g["fid_res"].update(target, real=True)
            g["fid_res"].update(preds, real=False)
        for name in ("features", "features_res"):
            if name in g:
                g[name].update(preds, target)
        if "kid" in g:
            g["kid"].update(target, real=True)
            g["kid"].update(preds, real=False)
        if "class_consistency" in g:
            g["class_consistency"].update(preds, target)
        if "lpips" in g:
            g["lpips"].update(preds, target)
        if "psnr" in g:
            g["psnr"].update(preds, target)
        if "ssim" in g:
            g["ssim"].update(preds, target)
        if "swd" in g:
            g["swd"].update(target, real=True)
            g["swd"].update(preds, real=False)
        if "input_psnr" in g:
            f = self.config.input_consistency_factor
            g["input_psnr"].update(downscale(preds, f), downscale(target, f))
        if "clip" in g:
            g["clip"].update(
                (preds * 255).round().to(torch.uint8), list(captions or [""] * len(preds))
            )

    def _align_list_states(self) -> None:
        """Prepare this rank's states for the sync when ranks saw different numbers of
        batches, or none. Every list state (KID's features, SWD's patches) becomes ONE
        tensor, ``[0, *shape]`` where this rank saw nothing: torchmetrics gathers such
        states element by element when their reduction is None (KID) and pads only the
        first dimension, so ranks that ran different numbers of updates would call
        different numbers of gathers with different shapes, and fail or hang. FID gets the
        output dtype its first update would have set. A collective: every rank calls it."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        states = {
            f"{path}.{attr}": (metric, attr)
            for path, metric in self.named_modules()
            if isinstance(metric, Metric)
            for attr, default in metric_defaults(metric).items()
            if isinstance(default, list)
        }
        mine = {}
        for key, (metric, attr) in states.items():
            value = getattr(metric, attr)
            if value:
                mine[key] = (tuple(value[0].shape[1:]), value[0].dtype)
        gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, mine)
        known = {k: v for ranks in gathered for k, v in ranks.items()}
        for key, (metric, attr) in states.items():
            value = getattr(metric, attr)
            if value:
                setattr(metric, attr, [torch.cat(value)])
            elif key in known:
                shape, dtype = known[key]
                setattr(metric, attr, [torch.empty((0, *shape), dtype=dtype, device=metric.device)])
        for metric in self.modules():  # FID sets its output dtype in its first update only
            if isinstance(metric, FrechetInceptionDistance) and not hasattr(metric, "orig_dtype"):
                metric.orig_dtype = torch.float32

    def compute(self) -> dict[int, dict[str, float]]:
        """All metrics for every step count (reduced across processes: call on every rank)."""
        self._align_list_states()
        results: dict[int, dict[str, float]] = {}
        for steps in self.step_counts:
            g = self.groups[str(steps)]
            with warnings.catch_warnings():  # a rank may have seen no batch: still sync
                warnings.filterwarnings("ignore", message=".*before the ``update``")
                n = int(g["images"].compute().item())
            row: dict[str, float] = {"images": n}
            if n == 0:  # nothing evaluated at this step count (on any rank)
                results[steps] = row
                continue
            for name, metric in g.items():
                if name == "images" or isinstance(metric, FeatureStore):
                    continue
                if name == "kid":
                    metric.subset_size = min(metric.subset_size, n)
                    mean, std = metric.compute()
                    row["kid"], row["kid_std"] = float(mean), float(std)
                    continue
                row[name] = float(metric.compute())
            results[steps] = row
        return results

    def features(self) -> dict[int, dict[str, dict[str, Tensor]]]:
        """With ``save_features``: per step count, the stored features behind ``fid``
        (and ``fid_res``) as ``{"real": [N, D], "fake": [N, D]}``, gathered from every
        rank (a collective: call on every rank)."""
        self._align_list_states()  # ranks that saw no batch take part with empty rows
        out: dict[int, dict[str, dict[str, Tensor]]] = {}
        for steps in self.step_counts:
            g = self.groups[str(steps)]
            out[steps] = {
                metric: g[name].compute()
                for name, metric in (("features", "fid"), ("features_res", "fid_res"))
                if name in g
            }
        return out

    def reset(self) -> None:
        for g in self.groups.values():
            for metric in g.values():
                metric.reset()


LOWER_IS_BETTER = {"fid", "fid_rc", "fid_res", "kid", "kid_std", "lpips", "swd"}


def results_markdown(
    results: dict[int, dict[str, float]], title: str = "", image: str | None = None
) -> str:
    """One table: a row per step count, a column per metric; then ``image`` (a path
    relative to the markdown file), a grid of condition | samples at each step count of
    ``results`` | ground truth, if given."""
    first = next(iter(results.values()))
    kid = "kid" in first and "kid_std" in first  # one column: mean ± std
    columns = [c for c in first if c not in ("images", "kid_std" if kid else "")] + ["images"]
    arrows = {c: (" ↓" if c in LOWER_IS_BETTER else " ↑") if c != "images" else "" for c in columns}
    names = {c: "kid (± std)" if kid and c == "kid" else c for c in columns}
    lines = [f"### {title}", ""] if title else []
    lines.append("| steps | " + " | ".join(names[c] + arrows[c] for c in columns) + " |")
    lines.append("|---" * (len(columns) + 1) + "|")

    def cell(row: dict[str, float], c: str) -> str:
        if c == "images":
            return f"{int(row[c])}"
        if kid and c == "kid":
            return f"{row['kid']:.4g} ± {row['kid_std']:.3g}"
        return f"{row[c]:.4f}"

    for steps, row in results.items():
        lines.append(f"| {steps} | " + " | ".join(cell(row, c) for c in columns) + " |")
    if kid:
        lines += [
            "",
            "KID is an unbiased estimate (the mean over random subsets, ± its standard "
            "deviation), so it falls below 0 by chance when the two sets are close: a value "
            "within a couple of standard deviations of 0, negative ones included, means they "
            "cannot be told apart at this sample size.",
        ]
    if image is not None:
        steps = " | ".join(f"{s} {'step' if s == 1 else 'steps'}" for s in results)
        lines += [
            "",
            f"Samples of the first test batch, one per row: condition | {steps} | ground truth.",
            "",
            f"![test samples]({image})",
        ]
    return "\n".join(lines) + "\n"


def write_results(
    results: dict[int, dict[str, float]], folder: Path, meta: dict, image: str | None = None
) -> tuple[Path, Path]:
    """``metrics.json`` and ``metrics.md`` in ``folder``; ``image`` (a path relative to
    ``folder``, e.g. ``test_samples.png``) is embedded in ``metrics.md`` below the table."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "results": {str(k): v for k, v in results.items()}}
    json_path, md_path = folder / "metrics.json", folder / "metrics.md"
    json_path.write_text(json.dumps(payload, indent=2))
    title = ", ".join(f"{k}: {v}" for k, v in meta.items())
    md_path.write_text(results_markdown(results, title, image))
    return json_path, md_path
