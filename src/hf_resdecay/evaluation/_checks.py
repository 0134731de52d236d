"""Input checks shared by the evaluation functions: one place for the error messages users see."""

from __future__ import annotations

import numpy as np
import torch


def as_feature_matrix(features, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``features`` as a finite (samples, dim) tensor; ``ValueError`` naming ``name`` otherwise."""
    if features is None:
        raise ValueError(f"{name} is required: a (samples, dim) array of features")
    tensor = torch.as_tensor(np.asarray(features) if isinstance(features, list) else features)
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, dim); got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0:
        raise ValueError(f"{name} is empty: it needs at least one sample")
    tensor = tensor.to(dtype)
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).any(dim=1).sum())
        raise ValueError(f"{name} holds NaN or inf values in {bad} of {tensor.shape[0]} samples")
    return tensor


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


def check_same_dim(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    """Raise ``ValueError`` when two feature matrices have different feature dimensions."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{a_name} and {b_name} must have the same feature dimension; got {a.shape[1]} and {b.shape[1]}"
        )
