"""Evaluation metrics: tensors in, numbers out."""

from .features import ClassifierFeatures, DigitsClassifier, InceptionFeatures, RandomConvFeatures
from .suite import EvalSuite, MetricsConfig, results_markdown, write_results
from .weights import MissingWeightsError, resolve_weights

__all__ = [
    "ClassifierFeatures",
    "DigitsClassifier",
    "EvalSuite",
    "InceptionFeatures",
    "MetricsConfig",
    "MissingWeightsError",
    "RandomConvFeatures",
    "resolve_weights",
    "results_markdown",
    "write_results",
]
