"""Effective rank of a feature matrix: how many directions the representation really uses.

Both measures read the singular values ``s`` of the *uncentred* feature matrix (samples x dim), as the
decay paper does: ``p = s / sum(s)``, entropy ``H = -sum p log p``; RankMe (Garrido et al., 2023) is
``exp(H)`` with a small ``eps`` added to ``p``, a number between 1 and ``min(samples, dim)``.
"""

from __future__ import annotations

import math

import torch

from ._checks import as_feature_matrix

EFFECTIVE_RANK_KINDS = ("entropy", "rankme")


def effective_rank(features, kind: str = "rankme", eps: float = 1e-7) -> float:
    """Entropy of the normalised singular values (``kind="entropy"``, in nats) or RankMe ``exp`` of it."""
    if kind not in EFFECTIVE_RANK_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, EFFECTIVE_RANK_KINDS))}; got {kind!r}")
    matrix = as_feature_matrix(features, "features", dtype=torch.float64)
    singular_values = torch.linalg.svdvals(matrix)
    total = singular_values.sum()
    if total == 0:
        raise ValueError("features are all zero: the effective rank is undefined")
    p = singular_values / total + eps
    entropy = float(-(p * p.log()).sum())
    return entropy if kind == "entropy" else math.exp(entropy)
