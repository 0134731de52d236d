"""The Fréchet distance between Gaussian fits of two feature sets, in float64 without ``sqrtm``.

``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})``: ``tr((S1 S2)^{1/2})`` is the sum of square roots of the
eigenvalues of ``S1 S2``, read off a symmetric PSD matrix similar to it (``L^T S2 L`` with ``S1 = L L^T``, or
``S1^{1/2} S2 S1^{1/2}`` from ``eigh`` when ``S1`` is singular), or, with fewer samples than dimensions, the
singular values of the (N_a, N_b) cross-product of the features.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._checks import as_feature_matrix, check_same_dim

__all__ = ["COVARIANCE_RTOL", "feature_statistics", "frechet_distance", "frechet_distance_from_stats"]


def _as_features(features: Any, name: str) -> np.ndarray:
    """``features`` as a finite float64 (samples, dim) array with the two samples a covariance needs."""
    return as_feature_matrix(features, name, dtype=torch.float64, min_samples=2).detach().cpu().numpy()


def _warn_if_singular(n: int, dim: int, name: str) -> None:
    if n <= dim:
        warnings.warn(
            f"{name} has {n} samples for {dim}-d features: the covariance is singular (rank <= {n - 1}), so "
            "the Fréchet distance is strongly biased; use more samples than feature dimensions.",
            UserWarning,
            stacklevel=3,
        )


def feature_statistics(
    features: np.ndarray | Tensor, name: str = "features"
) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) in float64: the Gaussian fit FID compares.

    Warns (``UserWarning``) when there are no more samples than dimensions: the covariance is then singular
    and the distance strongly biased (FID papers use 10k-50k samples for 2048-d features).
    """
    array = _as_features(features, name)
    _warn_if_singular(*array.shape, name)
    return array.mean(axis=0), np.cov(array, rowvar=False)


def _check_stats(mu: Any, sigma: Any, mu_name: str, sigma_name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu.detach().cpu() if torch.is_tensor(mu) else mu, dtype=np.float64)
    sigma = np.asarray(sigma.detach().cpu() if torch.is_tensor(sigma) else sigma, dtype=np.float64)
    if mu.ndim != 1:
        raise ValueError(f"{mu_name} must be 1-D (feature_dim,); got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{sigma_name} must be ({mu.shape[0]}, {mu.shape[0]}) to match {mu_name}; got {sigma.shape}"
        )
    for value, name in ((mu, mu_name), (sigma, sigma_name)):
        if not np.isfinite(value).all():
            raise ValueError(f"{name} contains NaN or inf values")
    _check_covariance(sigma, sigma_name)
    return mu, sigma


COVARIANCE_RTOL = 1e-4
"""Relative round-off a covariance may carry (float32 storage or accumulation) and still count as symmetric
positive semi-definite: asymmetry up to this times its largest entry, eigenvalues down to minus this times
the largest one."""


def _check_covariance(sigma: np.ndarray, name: str) -> None:
    """Raise ``ValueError`` unless ``sigma`` is symmetric PSD up to :data:`COVARIANCE_RTOL`: the distance
    assumes it, and other matrices clip to a meaningless 0.0."""
    scale = float(np.abs(sigma).max()) if sigma.size else 0.0
    asymmetry = float(np.abs(sigma - sigma.T).max()) if sigma.size else 0.0
    if asymmetry > COVARIANCE_RTOL * scale:
        raise ValueError(
            f"{name} must be symmetric (a covariance matrix); its largest |{name} - {name}.T| entry is "
            f"{asymmetry:.3g}, {asymmetry / scale:.3g} of its largest entry (allowed: {COVARIANCE_RTOL:g})"
        )
    eigenvalues = np.linalg.eigvalsh((sigma + sigma.T) / 2)
    if eigenvalues.size and eigenvalues[0] < -COVARIANCE_RTOL * max(float(eigenvalues[-1]), 0.0):
        raise ValueError(
            f"{name} must be positive semi-definite (a covariance matrix); its smallest eigenvalue "
            f"{eigenvalues[0]:.3g} is below -{COVARIANCE_RTOL:g} x its largest ({eigenvalues[-1]:.3g})"
        )


def _psd_eigenvalues(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off (below ``D * eps * max``) set to 0, so that a singular
    covariance does not add ``sqrt(round-off)`` for each of its zero eigenvalues."""
    tolerance = len(eigenvalues) * np.finfo(np.float64).eps * max(float(np.abs(eigenvalues).max()), 1e-300)
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def _sum_sqrt_eigvalsh(matrix: np.ndarray) -> float:
    """Sum of square roots of the eigenvalues of a symmetric PSD matrix."""
    return float(np.sqrt(_psd_eigenvalues(np.linalg.eigvalsh((matrix + matrix.T) / 2))).sum())


def _trace_sqrt_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr((S1 S2)^{1/2})`` as ``sum sqrt(eig(S1^{1/2} S2 S1^{1/2}))``, ``S1^{1/2}`` from ``eigh``."""
    eigenvalues, eigenvectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root = (eigenvectors * np.sqrt(_psd_eigenvalues(eigenvalues))) @ eigenvectors.T
    return _sum_sqrt_eigvalsh(root @ sigma2 @ root)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr((S1 S2)^{1/2})``: with ``S1 = L L^T`` (Cholesky), ``S1 S2`` is similar to the symmetric PSD
    ``L^T S2 L``, so one Cholesky and one ``eigvalsh`` suffice. Singular covariances fall back to ``eigh``."""
    for a, b in ((sigma1, sigma2), (sigma2, sigma1)):  # the trace is symmetric in S1 and S2
        try:
            lower = np.linalg.cholesky(a)
        except np.linalg.LinAlgError:
            continue
        return _sum_sqrt_eigvalsh(lower.T @ b @ lower)
    return _trace_sqrt_eigh(sigma1, sigma2)


def frechet_distance_from_stats(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), float64, via symmetric eigensolvers.

    ``tr((S1 S2)^{1/2})`` is the sum of square roots of the eigenvalues of ``S1 S2``, taken from a symmetric
    matrix similar to it (Cholesky, or ``eigh`` for singular covariances) instead of ``scipy.linalg.sqrtm``'s
    Schur method: many times faster at 2048-d, and no complex round-off.
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "mu1", "sigma1")
    mu2, sigma2 = _check_stats(mu2, sigma2, "mu2", "sigma2")
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"mu1/sigma1 and mu2/sigma2 have different feature dims: {mu1.shape[0]} vs {mu2.shape[0]}"
        )
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * _trace_sqrt_product(sigma1, sigma2)
    return float(max(distance, 0.0))  # exact value is >= 0; clip round-off below zero


def frechet_distance(features_a: np.ndarray | Tensor, features_b: np.ndarray | Tensor) -> float:
    """Fréchet distance between Gaussian fits of two (N, D) feature sets (FID when D is Inception's 2048).

    With fewer samples than dimensions it works in sample space: for centred, scaled features ``A`` and
    ``B`` (``S1 = A^T A``, ``S2 = B^T B``), ``tr((S1 S2)^{1/2})`` is the nuclear norm of ``A B^T``.
    """
    a = _as_features(features_a, "features_a")
    b = _as_features(features_b, "features_b")
    check_same_dim(a, "features_a", b, "features_b")
    if min(len(a), len(b)) > a.shape[1]:
        return frechet_distance_from_stats(
            *feature_statistics(a, "features_a"), *feature_statistics(b, "features_b")
        )
    _warn_if_singular(*a.shape, "features_a")
    _warn_if_singular(*b.shape, "features_b")
    a_centred = (a - a.mean(0)) / np.sqrt(len(a) - 1)
    b_centred = (b - b.mean(0)) / np.sqrt(len(b) - 1)
    trace_sqrt = np.linalg.svd(a_centred @ b_centred.T, compute_uv=False).sum()
    diff = a.mean(0) - b.mean(0)
    distance = diff @ diff + (a_centred**2).sum() + (b_centred**2).sum() - 2.0 * trace_sqrt
    return float(max(distance, 0.0))
