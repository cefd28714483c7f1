"""Sample-quality metrics in the ADM evaluator's definitions, on activations of several feature spaces."""
from reals.metrics.features import FEATURE_SPACES, FeatureExtractor, build_feature_extractor
from reals.metrics.fid_inception import FIDInceptionV3, build_fid_inception, find_weights
from reals.metrics.frechet import activation_statistics, frechet_distance, frechet_distance_from_activations
from reals.metrics.inception_score import inception_score
from reals.metrics.precision_recall import manifold_radii, precision_recall
from reals.metrics.suite import space_metrics

__all__ = [
    "FEATURE_SPACES", "FeatureExtractor", "FIDInceptionV3", "activation_statistics", "build_feature_extractor",
    "build_fid_inception", "find_weights", "frechet_distance", "frechet_distance_from_activations",
    "inception_score", "manifold_radii", "precision_recall", "space_metrics",
]
