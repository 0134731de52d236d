"""Score a checkpoint's frozen representations: kNN, linear probe and effective rank, per layer.

This is what ``hf-resdecay evaluate`` runs. kNN accuracy and effective rank are computed for every layer
(depth curves); the linear probe reads the last layer only (it is the slow part).
"""

from __future__ import annotations

from collections.abc import Sequence

from .features import extract_features
from .knn import KNN_PROTOCOL, knn_accuracy
from .linear_probe import linear_probe
from .rank import effective_rank

REPRESENTATION_METRICS = ("knn", "linear_probe", "effective_rank")


def evaluate_representations(
    model_or_id,
    train_dataset,
    test_dataset,
    metrics: Sequence[str] = REPRESENTATION_METRICS,
    pooling: str = "mean",
    layers: Sequence[int] | str = "all",
    k: int = 20,
    temperature: float = 0.07,
    probe_protocol: str = "paper",
    probe_epochs: int = 100,
    batch_size: int = 64,
    revision: str | None = None,
    cache: bool = True,
    progress: bool = True,
) -> dict:
    """Features of both datasets under the model, then every requested metric; a JSON-ready dict.

    ``knn`` and ``effective_rank`` hold one value per extracted layer (effective rank on the test
    features, RankMe); ``summary`` holds the last layer's figures.
    """
    unknown = sorted(set(metrics) - set(REPRESENTATION_METRICS))
    if unknown or not metrics:
        raise ValueError(
            f"metrics must be a non-empty subset of {list(REPRESENTATION_METRICS)}; got {list(metrics)}"
        )
    options = dict(pooling=pooling, layers=layers, batch_size=batch_size, revision=revision, cache=cache)
    train = extract_features(model_or_id, train_dataset, progress=progress, **options)
    test = extract_features(model_or_id, test_dataset, progress=progress, **options)
    needs_labels = {"knn", "linear_probe"} & set(metrics)
    if needs_labels and (train.labels is None or test.labels is None):
        raise ValueError(f"{sorted(needs_labels)} need class labels, but the dataset has no label column")

    layer_ids = test.layers
    results: dict = {
        "layers": layer_ids,
        "pooling": pooling,
        "samples": {"train": len(train.last()), "test": len(test.last())},
    }
    summary: dict = {}
    if "knn" in metrics:
        scores = [
            knn_accuracy(train.features[i], train.labels, test.features[i], test.labels, k, temperature)
            for i in layer_ids
        ]
        results["knn"] = {
            "protocol": f"{KNN_PROTOCOL}, k={k}, T={temperature}",
            "top1": [score["top1"] for score in scores],
            "top5": [score["top5"] for score in scores],
        }
        summary["knn_top1"] = scores[-1]["top1"]
    if "effective_rank" in metrics:
        ranks = [effective_rank(test.features[i], kind="rankme") for i in layer_ids]
        results["effective_rank"] = {
            "kind": "rankme (exp of the singular-value entropy, uncentred)",
            "values": ranks,
        }
        summary["effective_rank"] = ranks[-1]
    if "linear_probe" in metrics:
        probe = linear_probe(
            train.last(), train.labels, test.last(), test.labels, protocol=probe_protocol, epochs=probe_epochs
        )
        results["linear_probe"] = probe.to_dict()
        summary["linear_probe_top1"] = probe.top1
    results["summary"] = summary
    return results
