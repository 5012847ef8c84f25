"""Evaluation metrics: tensors in, numbers out."""

from .features import InceptionFeatures, RandomConvFeatures
from .suite import EvalSuite, MetricsConfig, results_markdown, write_results
from .weights import MissingWeightsError, resolve_weights

__all__ = [
    "EvalSuite",
    "InceptionFeatures",
    "MetricsConfig",
    "MissingWeightsError",
    "RandomConvFeatures",
    "resolve_weights",
    "results_markdown",
    "write_results",
]
