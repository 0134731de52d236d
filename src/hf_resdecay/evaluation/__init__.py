"""Evaluation of representations and generators: features, kNN, linear probe, effective rank, FID."""

from .features import FeatureSet, extract_features
from .fid import frechet_distance, frechet_distance_from_stats
from .knn import KNN_PROTOCOL, knn_accuracy, knn_predict, knn_scores
from .linear_probe import LinearProbeResult, linear_probe
from .rank import effective_rank
from .suite import evaluate_representations

__all__ = [
    "KNN_PROTOCOL",
    "FeatureSet",
    "LinearProbeResult",
    "effective_rank",
    "evaluate_representations",
    "extract_features",
    "frechet_distance",
    "frechet_distance_from_stats",
    "knn_accuracy",
    "knn_predict",
    "knn_scores",
    "linear_probe",
]
