"""kNN accuracy of frozen features (DINO weighted kNN) as an ``evaluate`` metric."""

import datasets
import evaluate

from hf_resdecay.evaluation.knn import KNN_PROTOCOL, knn_accuracy

_DESCRIPTION = f"Top-1 and top-5 accuracy (%) of a {KNN_PROTOCOL} classifier fitted on training features."
_KWARGS = """
Args:
    features: test feature vectors, one per sample (added with add_batch/compute).
    labels: test class labels.
    train_features: (n_train, dim) training features (compute keyword).
    train_labels: n_train training labels (compute keyword).
    k: neighbours, default 20. temperature: vote temperature, default 0.07.
Returns:
    {"top1": float, "top5": float}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class KnnAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Caron et al., Emerging Properties in Self-Supervised Vision Transformers, ICCV 2021",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"features": datasets.Sequence(datasets.Value("float32")), "labels": datasets.Value("int64")}
            ),
        )

    def _compute(self, features, labels, train_features=None, train_labels=None, k=20, temperature=0.07):
        return knn_accuracy(train_features, train_labels, features, labels, k=k, temperature=temperature)
