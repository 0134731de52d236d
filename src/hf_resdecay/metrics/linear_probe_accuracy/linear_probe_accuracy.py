"""Linear-probe accuracy of frozen features as an ``evaluate`` metric."""

import datasets
import evaluate

from hf_resdecay.evaluation.linear_probe import linear_probe

_DESCRIPTION = (
    "Top-1 and top-5 accuracy (%) of a seeded linear probe ('paper' or 'mae' protocol) on frozen features."
)
_KWARGS = """
Args:
    features: test feature vectors, one per sample (added with add_batch/compute).
    labels: test class labels.
    train_features, train_labels: training set (compute keywords).
    protocol: "paper" (AdamW lr 1e-2, cosine) or "mae" (BatchNorm without affine, SGD).
    epochs, batch_size, seed: training settings.
Returns:
    {"top1", "top5", "train_top1", "protocol", "epochs", "batch_size", "lr"}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class LinearProbeAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="He et al., Masked Autoencoders Are Scalable Vision Learners, CVPR 2022",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"features": datasets.Sequence(datasets.Value("float32")), "labels": datasets.Value("int64")}
            ),
        )

    def _compute(
        self,
        features,
        labels,
        train_features=None,
        train_labels=None,
        protocol="paper",
        epochs=100,
        batch_size=256,
        seed=0,
    ):
        result = linear_probe(
            train_features,
            train_labels,
            features,
            labels,
            protocol=protocol,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
        )
        return result.to_dict()
