"""Input checks shared by the evaluation functions and the commands: one place for the messages users see."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch


def integer_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers ``>= minimum`` (argparse names the flag in its error)."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}; got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}; got {number}")
        return number

    return parse


def as_feature_matrix(
    features, name: str, dtype: torch.dtype = torch.float32, min_samples: int = 1
) -> torch.Tensor:
    """``features`` as a finite (samples, dim) tensor with at least ``min_samples`` rows; ``ValueError``
    naming ``name`` otherwise."""
    if features is None:
        raise ValueError(f"{name} is required: a (samples, dim) array of features")
    if not torch.is_tensor(features):
        features = np.asarray(features)
        if not features.flags.writeable:  # memory-mapped features: read them into memory once
            features = np.array(features)
    tensor = torch.as_tensor(features)
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, dim); got shape {tuple(tensor.shape)}")
    if tensor.shape[0] < min_samples:
        plural = "s" if min_samples > 1 else ""
        raise ValueError(f"{name} needs at least {min_samples} sample{plural}; got {tensor.shape[0]}")
    tensor = tensor.to(dtype)
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).any(dim=1).sum())
        raise ValueError(f"{name} holds NaN or inf values in {bad} of {tensor.shape[0]} samples")
    return tensor


def as_feature_rows(features, name: str):
    """``features`` as a (samples, dim) array without copying it: a tensor or numpy array (memory-mapped ones
    included) is returned as given, anything else as a numpy array. Finiteness is left to the reader of each
    block (:func:`as_feature_matrix` checks it at once); ``ValueError`` naming ``name`` for a wrong shape."""
    if features is None:
        raise ValueError(f"{name} is required: a (samples, dim) array of features")
    array = (
        features if torch.is_tensor(features) or isinstance(features, np.ndarray) else np.asarray(features)
    )
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, dim); got shape {tuple(array.shape)}")
    if array.shape[0] < 1:
        raise ValueError(f"{name} needs at least 1 sample; got 0")
    return array


def as_labels(labels, name: str, num_samples: int) -> torch.Tensor:
    """``labels`` as int64, one per sample; ``ValueError`` naming ``name`` otherwise."""
    if labels is None:
        raise ValueError(f"{name} is required: one integer class label per sample")
    tensor = torch.as_tensor(np.asarray(labels))
    if tensor.ndim != 1 or tensor.shape[0] != num_samples:
        raise ValueError(
            f"{name} must hold one label per sample ({num_samples}); got shape {tuple(tensor.shape)}"
        )
    if tensor.is_floating_point() and not torch.equal(tensor, tensor.round()):
        raise ValueError(f"{name} must be integer class labels; got non-integer values")
    return tensor.long()


def check_same_dim(a, a_name: str, b, b_name: str) -> None:
    """Raise ``ValueError`` when two feature matrices (tensors or arrays) differ in feature dimension."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{a_name} and {b_name} must have the same feature dimension; got {a.shape[1]} and {b.shape[1]}"
        )
