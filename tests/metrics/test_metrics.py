"""Each ``evaluate`` module loads from its folder offline and returns exactly the library's value."""

import evaluate
import numpy as np
import pytest

from hf_resdecay.evaluation import frechet_distance, knn_accuracy, linear_probe
from hf_resdecay.metrics import METRICS, metric_path


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(300, 12)), rng.normal(size=(80, 12))
    train_labels, test_labels = (train[:, 0] > 0).astype(int), (test[:, 0] > 0).astype(int)
    return train.astype(np.float32), train_labels, test.astype(np.float32), test_labels


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_knn_module(data):
    train, train_labels, test, test_labels = data
    metric = evaluate.load(metric_path("knn_accuracy"))
    got = metric.compute(
        features=test, labels=test_labels, train_features=train, train_labels=train_labels, k=10
    )
    assert got == knn_accuracy(train, train_labels, test, test_labels, k=10)


def test_knn_module_accumulates_batches(data):
    train, train_labels, test, test_labels = data
    metric = evaluate.load(metric_path("knn_accuracy"))
    for start in range(0, len(test), 25):
        metric.add_batch(features=test[start : start + 25], labels=test_labels[start : start + 25])
    assert metric.compute(train_features=train, train_labels=train_labels) == knn_accuracy(
        train, train_labels, test, test_labels
    )


def test_linear_probe_module(data):
    train, train_labels, test, test_labels = data
    metric = evaluate.load(metric_path("linear_probe_accuracy"))
    got = metric.compute(
        features=test, labels=test_labels, train_features=train, train_labels=train_labels, epochs=20
    )
    assert got == linear_probe(train, train_labels, test, test_labels, epochs=20).to_dict()
    assert got["top1"] > 80


def test_frechet_distance_module(data):
    train, _, test, _ = data
    metric = evaluate.load(metric_path("frechet_distance"))
    got = metric.compute(features=test.astype(np.float64), reference_features=train)
    assert got["frechet_distance"] == pytest.approx(frechet_distance(test, train), rel=1e-9)


def test_unknown_metric_name():
    with pytest.raises(ValueError, match="name must be one of knn_accuracy"):
        metric_path("accuracy")
    assert len(METRICS) == 3
