"""Evaluation metrics: tensors in, numbers out."""

from .features import (
    ClassifierFeatures,
    DigitsClassifier,
    DigitsResNet,
    InceptionFeatures,
    RandomConvFeatures,
)
from .suite import EvalSuite, MetricsConfig, frechet_distance, results_markdown, write_results
from .weights import MissingWeightsError, resolve_weights

__all__ = [
    "ClassifierFeatures",
    "DigitsClassifier",
    "DigitsResNet",
    "EvalSuite",
    "InceptionFeatures",
    "MetricsConfig",
    "MissingWeightsError",
    "RandomConvFeatures",
    "frechet_distance",
    "resolve_weights",
    "results_markdown",
    "write_results",
]
