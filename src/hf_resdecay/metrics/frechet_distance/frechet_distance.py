"""Fréchet distance between two feature sets as an ``evaluate`` metric; see hf_resdecay.evaluation.fid."""

import datasets
import evaluate

from hf_resdecay.evaluation.fid import frechet_distance

_DESCRIPTION = (
    "Fréchet distance between Gaussian fits of two feature sets (FID with Inception-v3 pool features)."
)
_KWARGS = """
Args:
    features: feature vectors of the first set (e.g. generated images), added with add_batch/compute.
    reference_features: (n, dim) features of the second set (compute keyword).
Returns:
    {"frechet_distance": float}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class FrechetDistance(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Heusel et al., GANs Trained by a Two Time-Scale Update Rule Converge ..., NeurIPS 2017",
            inputs_description=_KWARGS,
            features=datasets.Features({"features": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, features, reference_features=None):
        return {"frechet_distance": frechet_distance(features, reference_features)}
