"""Weighted k-nearest-neighbour classification of frozen features (DINO's protocol).

The decay paper does not publish its kNN protocol; we use DINO's (Caron et al., 2021), the common choice:
L2-normalised features, cosine similarity, the ``k`` most similar training samples vote for their class
with weight ``exp(similarity / temperature)``. Similarities are computed in chunks of test samples, so
memory stays at ``chunk_size x num_train`` whatever the test set size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import as_feature_matrix, as_labels, check_same_dim

KNN_PROTOCOL = "DINO weighted kNN (L2-normalised features, cosine similarity, votes exp(sim/T))"


def knn_scores(
    train_features,
    train_labels,
    test_features,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class votes for every test sample: ``(scores, classes)``.

    ``scores[i, c]`` is the summed weight of the neighbours of test sample ``i`` labelled ``classes[c]``
    (``classes`` are the distinct training labels, sorted).
    """
    train = as_feature_matrix(train_features, "train_features")
    test = as_feature_matrix(test_features, "test_features")
    check_same_dim(train, "train_features", test, "test_features")
    labels = as_labels(train_labels, "train_labels", train.shape[0])
    if not isinstance(k, int) or not 1 <= k <= train.shape[0]:
        raise ValueError(
            f"k must be an integer in [1, {train.shape[0]}] (the number of training samples); got {k}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    classes, label_index = torch.unique(labels, return_inverse=True)
    train = F.normalize(train, dim=1)
    scores = torch.zeros(test.shape[0], len(classes))
    for start in range(0, test.shape[0], chunk_size):
        chunk = F.normalize(test[start : start + chunk_size], dim=1)
        similarity, neighbours = (chunk @ train.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        scores[start : start + chunk_size].scatter_add_(1, label_index[neighbours], weights)
    return scores, classes


def knn_predict(
    train_features,
    train_labels,
    test_features,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predicted label of every test sample (the class with the largest weighted vote)."""
    scores, classes = knn_scores(train_features, train_labels, test_features, k, temperature, chunk_size)
    return classes[scores.argmax(dim=1)]


def knn_accuracy(
    train_features,
    train_labels,
    test_features,
    test_labels,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Top-1 and top-5 kNN accuracy in percent: ``{"top1": ..., "top5": ...}``.

    Top-5 counts a hit when the true class is among the five largest votes (all classes when fewer).
    """
    scores, classes = knn_scores(train_features, train_labels, test_features, k, temperature, chunk_size)
    truth = as_labels(test_labels, "test_labels", scores.shape[0])
    ranked = classes[scores.argsort(dim=1, descending=True, stable=True)]
    hits = ranked == truth[:, None]
    return {
        "top1": 100.0 * hits[:, 0].float().mean().item(),
        "top5": 100.0 * hits[:, :5].any(dim=1).float().mean().item(),
    }
