"""Score a checkpoint's frozen representations: kNN, linear probe and effective rank, per layer.

This is what ``hf-resdecay evaluate`` runs. kNN accuracy and effective rank are computed for every layer
(depth curves); the linear probe reads the last layer only (it is the slow part). The model is loaded once
and runs on ``device``; under ``accelerate launch`` every process extracts its share of the features and the
main one scores them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..data import find_label_column
from ._runtime import as_device
from .features import extract_features, load_encoder
from .knn import KNN_PROTOCOL, knn_accuracy
from .linear_probe import linear_probe
from .rank import effective_rank

REPRESENTATION_METRICS = ("knn", "linear_probe", "effective_rank")
LABELLED_METRICS = ("knn", "linear_probe")


def check_labels(dataset, where: str, fix: str, metrics: Sequence[str]) -> None:
    """Refuse, before any feature is extracted, a dataset that cannot score kNN or a linear probe: no label
    column, missing labels, or negative ones (hidden labels stored as -1, as in ImageNet's test split).

    ``where`` names the dataset in the message (``"split 'test' of imagenet-1k"``), ``fix`` says what to do
    instead (``"--test-split validation"``). Only the label column is read, not the images.
    """
    needs = sorted(set(LABELLED_METRICS) & set(metrics))
    if not needs:
        return
    column = find_label_column(dataset)
    if column is None:
        raise ValueError(
            f"{where} has no label column, but {needs} need class labels: evaluate on a labelled split "
            f"(e.g. {fix}) or use --metrics effective_rank"
        )
    values = list(dataset.select_columns([column]).with_format(None)[column])
    missing = sum(value is None for value in values)
    if missing:
        raise ValueError(
            f"{where} lacks {missing} label(s) in column {column!r}, but {needs} need class labels: try {fix}"
        )
    if not all(isinstance(value, (int, np.integer)) and not isinstance(value, bool) for value in values):
        raise ValueError(
            f"{where}: column {column!r} must hold integer class ids for {needs}; cast it to ClassLabel"
        )
    negative = sum(value < 0 for value in values)
    if negative:
        raise ValueError(
            f"{where} has {negative} negative label(s) in column {column!r} (hidden labels, stored as -1), "
            f"but {needs} need class labels: evaluate on a labelled split, e.g. {fix}"
        )


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
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    num_workers: int | None = None,
    split_between_processes: bool | None = None,
) -> dict | None:
    """Features of both datasets under the model, then every requested metric; a JSON-ready dict.

    ``knn`` and ``effective_rank`` hold one value per extracted layer (effective rank on the test
    features, RankMe); ``summary`` holds the last layer's figures; ``samples`` the number of images of each.
    ``device`` (default ``"auto"``: CUDA when available), ``dtype`` (autocast of the forward pass and the
    precision of kNN similarities), ``num_workers`` and ``split_between_processes`` are those of
    :func:`~hf_resdecay.evaluation.extract_features`. Under a distributed launch every process must call it;
    the main one returns the results, the others None.
    """
    unknown = sorted(set(metrics) - set(REPRESENTATION_METRICS))
    if unknown or not metrics:
        raise ValueError(
            f"metrics must be a non-empty subset of {list(REPRESENTATION_METRICS)}; got {list(metrics)}"
        )
    check_labels(train_dataset, "train_dataset", "a labelled training split", metrics)
    check_labels(test_dataset, "test_dataset", "a labelled split such as --test-split validation", metrics)
    target = as_device(device if device is not None else "auto")
    model, processor = load_encoder(model_or_id, revision)
    model.to(target)
    options = dict(
        pooling=pooling,
        layers=layers,
        batch_size=batch_size,
        image_processor=processor,
        cache=cache,
        progress=progress,
        device=target,
        dtype=dtype,
        num_workers=num_workers,
        split_between_processes=split_between_processes,
    )
    train = extract_features(model, train_dataset, **options)
    test = extract_features(model, test_dataset, **options)
    if train is None or test is None:  # not the main process: the main one scores
        return None

    layer_ids = test.layers
    results: dict = {
        "layers": layer_ids,
        "pooling": pooling,
        "samples": {"train": len(train.last()), "test": len(test.last())},
    }
    summary: dict = {}
    where = dict(device=target, dtype=dtype)
    if "knn" in metrics:
        scores = [
            knn_accuracy(
                train.features[i], train.labels, test.features[i], test.labels, k, temperature, **where
            )
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
            train.last(),
            train.labels,
            test.last(),
            test.labels,
            protocol=probe_protocol,
            epochs=probe_epochs,
            device=target,
        )
        results["linear_probe"] = probe.to_dict()
        summary["linear_probe_top1"] = probe.top1
    results["summary"] = summary
    return results
