"""Residual-alignment diagnostics (arXiv 2401.09018) and neural-collapse metrics, gathered in one report.

For every analysed sample and residual block ``l`` the branch Jacobian ``J_l`` (the skip excluded, see
:mod:`hf_resdecay.alignment.blocks`) is linearised at the block's input and its top singular triplets read
(:func:`~hf_resdecay.alignment.jacobian.residual_jacobian_svd`). From them:

- **RA1**: the sample's representations ``h_0 .. h_L`` lie on a line at equal steps. Line-shape score
  ``L / ||x~_L - x~_0||`` where ``x~`` accumulates the *unit-normalised* steps (1 = straight line, larger =
  bent), the coefficient of variation of the step lengths (0 = equispaced), and the share of the
  trajectory's variance on its first principal component.
- **RA2**: top singular vectors align. Within a Jacobian, ``|<u_i, v_i>|`` (chance level for random unit
  vectors is about ``sqrt(2 / (pi n))``). Across depths, ``M = U_j^T J_i V_j`` (top ``K`` vectors of block
  ``j``, Jacobian of block ``i``, same sample) is nearly diagonal: the fraction of its energy on the diagonal
  (1 for ``i = j``; about ``1/K`` by chance). And the overlap ``||U_i^T U_j||_F^2 / K`` of top-``K`` left
  subspaces.
- **RA3**: the rank of ``J_l`` is at most ``C`` (classes): numerical rank ``#{s_i > threshold * s_1}`` among
  the top ``k``, ``s_{C+1} / s_1``, and the share ``sum_{i<=C} s_i^2 / ||J||_F^2`` of the top ``C`` (the
  Frobenius norm from a Hutchinson estimate on the matrix-free path).
- **RA4**: ``s_1`` scales like ``1 / L``: ``s_1`` per block within a model, and :func:`depth_scaling` for the
  log-log slope of ``s_1`` against total depth across models.
- **NC1-NC4** at the last analysed block when labels are given (Papyan, Han & Donoho 2020).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import write_json_atomic
from .blocks import BlockCapture, ResidualBlock, capture_block_inputs, discover_residual_blocks
from .jacobian import JacobianSVD, analysis_attention, jacobian_rmatvec, residual_jacobian_svd

__all__ = [
    "AlignmentReport",
    "BlockStats",
    "DepthScaling",
    "analyze",
    "depth_scaling",
    "line_shape",
    "load_model",
    "neural_collapse",
    "numerical_rank",
    "run_alignment",
    "trajectory_stats",
]


@dataclass
class BlockStats:
    """Per-block results, averaged over the analysed samples."""

    name: str
    family: str
    kind: str
    alpha: float
    """Identity coefficient subtracted from the block to get its branch."""
    dim: int
    """Flattened input size ``n`` of the block (its Jacobian is ``n x n``)."""
    method: str
    singular_values: list[float]
    """Mean over samples of the top-``k`` singular values, descending."""
    singular_values_std: list[float]
    alignment: list[float]
    """Mean over samples of ``|<u_i, v_i>|`` for ``i = 1..k``."""
    numerical_rank: float
    """Mean numerical rank at the report's ``rank_threshold`` (counted among the top ``k``)."""
    rank_saturated: float
    """Share of samples whose every computed singular value passed the threshold (rank >= k)."""
    ratio_after_c: float | None
    """Mean ``s_{C+1} / s_1``; ``None`` when ``C`` is unknown or ``C >= k``."""
    energy_top_c: float | None
    """Mean ``sum_{i<=C} s_i^2 / ||J||_F^2``; ``None`` when ``C`` or ``||J||_F`` is unknown."""
    frobenius_sq: float | None
    """Mean ``||J||_F^2`` (exact on the dense path, estimated on the matrix-free path)."""

    @property
    def s1(self) -> float:
        return self.singular_values[0]


@dataclass
class AlignmentReport:
    """Everything :func:`analyze` measured; ``to_dict()`` / ``save_json()`` give plain JSON."""

    model: str
    num_samples: int
    top_k: int
    num_classes: int | None
    rank_threshold: float
    coupling_k: int
    settings: dict[str, Any]
    blocks: list[BlockStats]
    skipped: list[dict[str, str]]
    coupling_diag_fraction: list[list[float | None]]
    """``[i][j]``: mean diagonal energy fraction of ``U_j^T J_i V_j`` (``None``: shapes differ)."""
    subspace_overlap: list[list[float | None]]
    """``[i][j]``: mean ``||U_i^T U_j||_F^2 / K`` of the top-``K`` left singular subspaces."""
    ra1: dict[str, Any]
    """Trajectory statistics over the longest chain of consecutive blocks (``segment``)."""
    neural_collapse: dict[str, float | None] | None
    labels: list[int] | None = None
    trajectory_pca: list[list[list[float]]] = field(default_factory=list)
    """``[sample][point] -> [pc1, pc2]``: all samples' trajectories in one shared 2-D PCA."""
    sample_trajectory_pca: list[list[float]] = field(default_factory=list)
    """First sample's trajectory in its own 2-D PCA."""

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def s1(self) -> list[float]:
        """Mean top singular value per block (RA4 within the model)."""
        return [block.s1 for block in self.blocks]

    def summary(self) -> dict[str, float | int | None]:
        """One number per diagnostic, averaged over blocks (off-diagonal pairs for cross-depth ones)."""
        blocks = self.blocks
        k_c = self.coupling_k

        def mean(values: Sequence[float | None]) -> float | None:
            kept = [value for value in values if value is not None and not math.isnan(value)]
            return sum(kept) / len(kept) if kept else None

        def off_diagonal(matrix: list[list[float | None]]) -> float | None:
            return mean([value for i, row in enumerate(matrix) for j, value in enumerate(row) if i != j])

        s1_mean = mean(self.s1)
        nc = self.neural_collapse or {}
        return {
            "num_blocks": self.num_blocks,
            "ra1_line_shape": self.ra1.get("line_shape"),
            "ra1_step_cv": self.ra1.get("step_cv"),
            "ra1_pc1_share": self.ra1.get("pc1_share"),
            "ra2_alignment_top1": mean([block.alignment[0] for block in blocks]),
            "ra2_alignment_top_k": mean([mean(block.alignment[:k_c]) for block in blocks]),
            "ra2_alignment_chance": mean([math.sqrt(2 / (math.pi * block.dim)) for block in blocks]),
            "ra2_coupling_diag": off_diagonal(self.coupling_diag_fraction),
            "ra2_coupling_chance": 1.0 / k_c,
            "ra2_subspace_overlap": off_diagonal(self.subspace_overlap),
            "ra3_numerical_rank": mean([block.numerical_rank for block in blocks]),
            "ra3_ratio_after_c": mean([block.ratio_after_c for block in blocks]),
            "ra3_energy_top_c": mean([block.energy_top_c for block in blocks]),
            "ra4_s1_mean": s1_mean,
            "ra4_s1_times_depth": None if s1_mean is None else s1_mean * self.num_blocks,
            "nc1": nc.get("nc1"),
            "nc2_equinorm": nc.get("nc2_equinorm"),
            "nc2_equiangular": nc.get("nc2_equiangular"),
            "nc3_self_duality": nc.get("nc3_self_duality"),
            "nc4_ncc_mismatch": nc.get("nc4_ncc_mismatch"),
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready) with the summary included under ``"summary"``."""
        data = asdict(self)
        data["summary"] = self.summary()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AlignmentReport:
        """Inverse of :meth:`to_dict` (the summary is recomputed, not read)."""
        names = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in names}
        values["blocks"] = [BlockStats(**block) for block in data["blocks"]]
        return cls(**values)

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON atomically (temporary file in the same folder, then ``os.replace``)."""
        return write_json_atomic(_finite(self.to_dict()), path)

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> AlignmentReport:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _finite(value: Any) -> Any:
    """NaN and infinities become ``None`` so the file is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


# ----------------------------------------------------------------------------------------------- metrics


def numerical_rank(singular_values: torch.Tensor, threshold: float) -> int:
    """``#{i : s_i > threshold * s_1}``: numerical rank at a relative threshold, ``0 < threshold < 1``."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1) (relative to s_1); got {threshold!r}")
    values = singular_values.double()
    if values.numel() == 0 or values[0] <= 0:
        return 0
    return int((values > threshold * values[0]).sum())


def line_shape(points: torch.Tensor) -> float:
    """RA1 line-shape score of a trajectory ``points`` (``(L + 1, d)``): ``L / ||sum of unit steps||``.

    1 for points on a straight line travelled in one direction; grows as the path bends (``inf`` when it
    returns to its start). Zero-length steps are left out.
    """
    steps = points[1:].double() - points[:-1].double()
    lengths = steps.norm(dim=1)
    moving = lengths > 0
    if not bool(moving.any()):
        return float("nan")
    unit = steps[moving] / lengths[moving, None]
    end = unit.sum(0).norm()
    return float(unit.shape[0] / end) if end > 0 else float("inf")


def trajectory_stats(points: torch.Tensor) -> dict[str, float]:
    """RA1 statistics of one trajectory (``(L + 1, d)``): line shape, step-length CV, PC1 variance share."""
    points = points.double().reshape(points.shape[0], -1)
    lengths = (points[1:] - points[:-1]).norm(dim=1)
    step_cv = float(lengths.std(unbiased=False) / lengths.mean()) if lengths.mean() > 0 else float("nan")
    centered = points - points.mean(0)
    energy = torch.linalg.svdvals(centered).pow(2)
    pc1 = float(energy[0] / energy.sum()) if energy.sum() > 0 else float("nan")
    return {"line_shape": line_shape(points), "step_cv": step_cv, "pc1_share": pc1}


def neural_collapse(
    features: torch.Tensor,
    labels: torch.Tensor,
    classifier: nn.Module | None = None,
) -> dict[str, float | None]:
    """NC1-NC4 of ``features`` (``(N, d)``) with integer ``labels`` (``(N,)``, at least two classes).

    - ``nc1``: ``tr(Sigma_W Sigma_B^+) / C``, within-class variability relative to between-class (-> 0).
    - ``nc2_equinorm``: std / mean of the centred class-mean norms (-> 0); ``nc2_equiangular``: mean of
      ``|cos(mu_c, mu_c') + 1 / (C - 1)|`` over class pairs (-> 0 for a simplex equiangular tight frame).
    - ``nc3_self_duality``: ``|| W / ||W|| - M / ||M|| ||_F`` between the classifier weights and the centred
      class means (-> 0); needs a ``classifier`` with a 2-D ``weight`` (``nn.Linear``), else ``None``.
    - ``nc4_ncc_mismatch``: share of samples where the classifier's decision differs from the nearest
      class mean's (-> 0); needs ``classifier``, else ``None``.
    """
    features = features.double().reshape(features.shape[0], -1)
    labels = torch.as_tensor(labels).reshape(-1).long()
    if labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"labels must hold one label per sample ({features.shape[0]}); got {labels.shape[0]}"
        )
    classes = torch.unique(labels)
    if classes.numel() < 2:
        raise ValueError("labels must contain at least two classes for neural-collapse metrics")
    global_mean = features.mean(0)
    means = torch.stack([features[labels == c].mean(0) for c in classes])
    centred = means - global_mean
    within = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64)
    for index, c in enumerate(classes):
        diff = features[labels == c] - means[index]
        within += diff.T @ diff
    within /= features.shape[0]
    between = centred.T @ centred / classes.numel()
    if float(torch.trace(between)) <= 1e-12 * max(float(torch.trace(within)), 1e-300):
        nc1 = float("nan")  # class means coincide (e.g. collapsed features): undefined, not 0
    else:
        nc1 = float(torch.trace(within @ torch.linalg.pinv(between, hermitian=True)) / classes.numel())
    norms = centred.norm(dim=1)
    unit = centred / norms[:, None].clamp_min(1e-30)
    cosines = unit @ unit.T
    upper = torch.triu_indices(classes.numel(), classes.numel(), offset=1)
    pair_cos = cosines[upper[0], upper[1]]
    result: dict[str, float | None] = {
        "num_classes": int(classes.numel()),
        "nc1": nc1,
        "nc2_equinorm": float(norms.std(unbiased=False) / norms.mean()),
        "nc2_equiangular": float((pair_cos + 1.0 / (classes.numel() - 1)).abs().mean()),
        "nc3_self_duality": None,
        "nc4_ncc_mismatch": None,
    }
    if classifier is not None:
        weight = getattr(classifier, "weight", None)
        if (
            isinstance(weight, torch.Tensor)
            and weight.ndim == 2
            and weight.shape[0] >= int(classes.max()) + 1
        ):
            w = weight.detach().double()[classes]
            result["nc3_self_duality"] = float((w / w.norm() - centred / centred.norm()).norm())
        with torch.no_grad():
            parameter = next(classifier.parameters(), None)
            dtype = parameter.dtype if parameter is not None else torch.float32
            logits = classifier(features.to(dtype)).double()
        predicted = logits.argmax(dim=1)
        nearest = classes[torch.cdist(features, means).argmin(dim=1)]
        result["nc4_ncc_mismatch"] = float((predicted != nearest).double().mean())
    return result


@dataclass
class DepthScaling:
    """RA4 across models: fit of ``log s_1 = intercept + slope * log L`` (``slope ~ -1`` under RA4)."""

    depths: list[int]
    s1: list[float]
    slope: float
    intercept: float
    r2: float


def depth_scaling(reports: Sequence[AlignmentReport]) -> DepthScaling:
    """Log-log slope of the mean top singular value against total depth, over reports of different depth."""
    if len(reports) < 2:
        raise ValueError(f"reports must hold at least 2 reports of different depths; got {len(reports)}")
    depths = [report.num_blocks for report in reports]
    if len(set(depths)) < 2:
        raise ValueError(f"reports must cover at least 2 different depths; got depths {depths}")
    s1 = [sum(report.s1) / len(report.s1) for report in reports]
    x = torch.tensor(depths, dtype=torch.float64).log()
    y = torch.tensor(s1, dtype=torch.float64).log()
    design = torch.stack([torch.ones_like(x), x], dim=1)
    solution = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    fitted = design @ solution
    total = (y - y.mean()).pow(2).sum()
    r2 = float(1 - (y - fitted).pow(2).sum() / total) if total > 0 else 1.0
    return DepthScaling(depths, s1, float(solution[1]), float(solution[0]), r2)


# ---------------------------------------------------------------------------------------------- analysis


def _pooled_features(output: torch.Tensor) -> torch.Tensor:
    """Per-sample feature vectors of a block output: as is (2-D), token mean (3-D), spatial mean (4-D)."""
    if output.ndim == 2:
        return output
    if output.ndim == 3:
        return output.mean(dim=1)
    if output.ndim == 4:
        return output.mean(dim=(2, 3))
    return output.reshape(output.shape[0], -1)


def _longest_chain(captures: Sequence[BlockCapture]) -> tuple[int, int]:
    """Longest run ``[a, b]`` of blocks where each one's input is the previous one's output."""
    best, start = (0, 0), 0
    for index in range(1, len(captures)):
        previous, current = captures[index - 1].output, captures[index].input
        chained = previous.shape == current.shape and torch.equal(previous, current)
        if not chained:
            start = index
        if index - start > best[1] - best[0]:
            best = (start, index)
    return best


def _pca_2d(points: torch.Tensor) -> torch.Tensor:
    """Rows of ``points`` (``(p, d)``) projected on their first two principal components, ``(p, 2)``."""
    centred = points.double() - points.double().mean(0)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    coords = u[:, :2] * s[:2]
    if coords.shape[1] < 2:
        coords = torch.cat([coords, torch.zeros(coords.shape[0], 2 - coords.shape[1], dtype=coords.dtype)], 1)
    return coords


def _check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def analyze(
    model: nn.Module,
    inputs: torch.Tensor | Mapping[str, Any],
    labels: torch.Tensor | Sequence[int] | None = None,
    top_k: int = 16,
    *,
    blocks: Sequence[nn.Module] | None = None,
    alphas: Sequence[float] | float | None = None,
    num_classes: int | None = None,
    classifier: nn.Module | None = None,
    rank_threshold: float = 0.1,
    coupling_k: int | None = None,
    coupling_samples: int | None = None,
    method: str = "auto",
    oversample: int = 8,
    power_iters: int = 2,
    frobenius_probes: int = 16,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    progress: bool | Any = False,
    model_name: str | None = None,
) -> AlignmentReport:
    """Measure RA1-RA4 (and NC1-NC4 with ``labels``) of ``model`` on a batch of ``inputs``.

    Args:
        model: a transformers / diffusers model or any module (then pass ``blocks``). Put in eval mode for
            the analysis and restored afterwards; attention runs in a forward-differentiable kernel.
        inputs: one batch: a tensor passed positionally (``pixel_values``) or a mapping of keyword inputs
            (a DiT's ``hidden_states``, ``timestep``, ``class_labels``). Every sample in it is analysed.
        labels: integer class of each sample: enables NC metrics and sets ``C`` unless ``num_classes``.
        top_k: singular triplets per Jacobian.
        blocks, alphas: explicit blocks and identity coefficients (see ``discover_residual_blocks``).
        num_classes: ``C`` for RA3 (defaults to the classes in ``labels``, else the classifier's outputs).
        classifier: the module mapping last-block features to logits, for NC3 / NC4.
        rank_threshold: relative threshold of the numerical rank, in ``(0, 1)``.
        coupling_k: ``K``, the number of top vectors in cross-depth products and subspace overlaps
            (default ``min(C, top_k)``, or ``top_k`` when ``C`` is unknown).
        coupling_samples: how many of the samples get cross-depth products (default all; each costs one
            batched vjp of ``num_blocks * K`` vectors per block).
        method, oversample, power_iters, frobenius_probes, dtype, chunk_size: passed to
            :func:`~hf_resdecay.alignment.jacobian.residual_jacobian_svd`.
        seed: seed of the random sketches.
        progress: ``True`` for a tqdm bar over (block, sample) pairs, or a tqdm-like object to update.
        model_name: recorded in the report (defaults to the model's class name or ``name_or_path``).
    """
    top_k = _check_positive_int("top_k", top_k)
    if not 0.0 < rank_threshold < 1.0:
        raise ValueError(f"rank_threshold must be in (0, 1) (relative to s_1); got {rank_threshold!r}")
    discovered = discover_residual_blocks(model, blocks=blocks, alphas=alphas)
    label_tensor = None if labels is None else torch.as_tensor(labels).reshape(-1).long()
    if num_classes is None and label_tensor is not None:
        num_classes = int(torch.unique(label_tensor).numel())
    if num_classes is None and isinstance(getattr(classifier, "out_features", None), int):
        num_classes = classifier.out_features
    if num_classes is not None:
        num_classes = _check_positive_int("num_classes", num_classes)
    if coupling_k is None:
        coupling_k = min(num_classes, top_k) if num_classes else top_k
    coupling_k = _check_positive_int("coupling_k", coupling_k)
    if coupling_k > top_k:
        raise ValueError(f"coupling_k must be in [1, top_k={top_k}]; got {coupling_k}")

    was_training = model.training
    model.eval()
    try:
        with analysis_attention(model):
            captures = capture_block_inputs(model, discovered.blocks, inputs)
            num_samples = captures[0].input.shape[0]
            if label_tensor is not None and label_tensor.shape[0] != num_samples:
                raise ValueError(
                    f"labels must hold one label per sample ({num_samples}); got {label_tensor.shape[0]}"
                )
            if coupling_samples is None:
                coupling_samples = num_samples
            coupling_samples = _check_positive_int("coupling_samples", coupling_samples, 0)
            per_sample = _analyse_samples(
                captures,
                num_samples,
                top_k=top_k,
                num_classes=num_classes,
                rank_threshold=rank_threshold,
                coupling_k=coupling_k,
                coupling_samples=min(coupling_samples, num_samples),
                svd_kwargs=dict(
                    oversample=oversample,
                    power_iters=power_iters,
                    method=method,
                    frobenius_probes=frobenius_probes,
                    dtype=dtype,
                    chunk_size=chunk_size,
                ),
                seed=seed,
                progress=progress,
            )
    finally:
        model.train(was_training)

    block_stats = [
        _block_stats(capture.block, capture, stats)
        for capture, stats in zip(captures, per_sample[0], strict=True)
    ]
    coupling, overlap = per_sample[1], per_sample[2]
    start, end = _longest_chain(captures)
    points = torch.stack(
        [captures[start].input, *[capture.output for capture in captures[start : end + 1]]], dim=1
    )  # (samples, steps + 1, ...)
    points = points.reshape(points.shape[0], points.shape[1], -1)
    trajectories = [trajectory_stats(points[s]) for s in range(num_samples)]
    ra1: dict[str, Any] = {
        "segment": [captures[start].block.name, captures[end].block.name],
        "segment_blocks": end - start + 1,
    }
    for key in ("line_shape", "step_cv", "pc1_share"):
        values = [t[key] for t in trajectories]
        ra1[key] = _nanmean(values)
        ra1[f"{key}_per_sample"] = values
    shared = _pca_2d(points.reshape(-1, points.shape[-1])).reshape(num_samples, points.shape[1], 2)
    nc = None
    if label_tensor is not None:
        nc = neural_collapse(_pooled_features(captures[-1].output), label_tensor, classifier)
    name = model_name or getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__
    return AlignmentReport(
        model=str(name),
        num_samples=num_samples,
        top_k=top_k,
        num_classes=num_classes,
        rank_threshold=rank_threshold,
        coupling_k=coupling_k,
        settings=dict(
            method=method,
            oversample=oversample,
            power_iters=power_iters,
            frobenius_probes=frobenius_probes,
            dtype=str(dtype or captures[0].input.dtype).replace("torch.", ""),
            coupling_samples=coupling_samples,
            seed=seed,
        ),
        blocks=block_stats,
        skipped=[asdict(skipped) for skipped in discovered.skipped],
        coupling_diag_fraction=coupling,
        subspace_overlap=overlap,
        ra1=ra1,
        neural_collapse=nc,
        labels=None if label_tensor is None else label_tensor.tolist(),
        trajectory_pca=shared.tolist(),
        sample_trajectory_pca=_pca_2d(points[0]).tolist(),
    )


def _nanmean(values: Sequence[float]) -> float:
    kept = [value for value in values if not math.isnan(value)]
    return sum(kept) / len(kept) if kept else float("nan")


def _sample_stats(
    svd: JacobianSVD, top_k: int, num_classes: int | None, rank_threshold: float
) -> dict[str, Any]:
    s = svd.singular_values.double()
    rank = numerical_rank(s, rank_threshold)
    ratio = energy = None
    if num_classes is not None and num_classes < s.numel() and s[0] > 0:
        ratio = float(s[num_classes] / s[0])
    if num_classes is not None and svd.frobenius_sq:
        energy = min(1.0, float(s[:num_classes].pow(2).sum() / svd.frobenius_sq))
    alignment = (
        (svd.left.double() * svd.right.double()).sum(0).abs() if svd.left.shape == svd.right.shape else None
    )
    return {
        "s": s,
        "rank": rank,
        "saturated": rank >= top_k,
        "ratio": ratio,
        "energy": energy,
        "fro": svd.frobenius_sq,
        "alignment": alignment,
        "method": svd.method,
    }


def _analyse_samples(
    captures: Sequence[BlockCapture],
    num_samples: int,
    *,
    top_k: int,
    num_classes: int | None,
    rank_threshold: float,
    coupling_k: int,
    coupling_samples: int,
    svd_kwargs: dict[str, Any],
    seed: int,
    progress: bool | Any,
) -> tuple[list[list[dict[str, Any]]], list[list[float | None]], list[list[float | None]]]:
    """SVDs of every (block, sample), then cross-depth products per sample; returns raw per-sample stats."""
    num_blocks = len(captures)
    for capture in captures:
        dim = capture.input[0].numel()
        if top_k > dim:
            raise ValueError(f"top_k must be in [1, {dim}] (block {capture.block.name} has {dim} inputs)")
    bar, own_bar = _progress(progress, num_blocks * num_samples)
    stats: list[list[dict[str, Any]]] = [[] for _ in range(num_blocks)]
    coupling_sum = [[0.0] * num_blocks for _ in range(num_blocks)]
    overlap_sum = [[0.0] * num_blocks for _ in range(num_blocks)]
    generator = torch.Generator().manual_seed(seed)
    dtype = svd_kwargs.get("dtype")
    try:
        for sample in range(num_samples):
            functions, points, svds = [], [], []
            for capture in captures:
                h, args, kwargs = capture.sample(sample)
                fn = capture.block.branch(h, args, kwargs, dtype=dtype)
                if dtype is not None:
                    h = h.to(dtype)
                svd = residual_jacobian_svd(fn, h, top_k, generator=generator, **svd_kwargs)
                stats[len(functions)].append(_sample_stats(svd, top_k, num_classes, rank_threshold))
                functions.append(fn)
                points.append(h)
                svds.append(svd)
                if bar is not None:
                    bar.update(1)
            for i in range(num_blocks):
                for j in range(num_blocks):
                    overlap_sum[i][j] += _overlap(svds[i], svds[j], coupling_k)
            if sample < coupling_samples:
                for i in range(num_blocks):
                    row = _coupling_row(
                        functions[i], points[i], svds, i, coupling_k, svd_kwargs.get("chunk_size")
                    )
                    for j, value in enumerate(row):
                        coupling_sum[i][j] += value
    finally:
        if own_bar:
            bar.close()

    def average(matrix: list[list[float]], count: int) -> list[list[float | None]]:
        return [
            [None if math.isnan(value) or count == 0 else value / count for value in row] for row in matrix
        ]

    return stats, average(coupling_sum, coupling_samples), average(overlap_sum, num_samples)


def _overlap(first: JacobianSVD, second: JacobianSVD, k: int) -> float:
    if first.left.shape[0] != second.left.shape[0]:
        return float("nan")
    product = first.left[:, :k].double().T @ second.left[:, :k].double()
    return float(product.pow(2).sum() / k)


def _coupling_row(
    fn, h: torch.Tensor, svds: Sequence[JacobianSVD], i: int, k: int, chunk_size: int | None
) -> list[float]:
    """Diagonal energy fraction of ``U_j^T J_i V_j`` for every block ``j`` (NaN where shapes differ)."""
    matching = [j for j, svd in enumerate(svds) if svd.left.shape[0] == svds[i].left.shape[0]]
    if svds[i].dense is not None:
        jacobian = svds[i].dense.double()
        rows = {j: svds[j].left[:, :k].double().T @ jacobian for j in matching}
    else:
        cotangents = torch.cat([svds[j].left[:, :k].T for j in matching]).to(h.dtype)
        products = jacobian_rmatvec(fn, h, cotangents, chunk_size).double()
        rows = {j: products[index * k : (index + 1) * k] for index, j in enumerate(matching)}
    result = [float("nan")] * len(svds)
    for j, row in rows.items():
        matrix = row @ svds[j].right[:, :k].double()  # U_j^T J_i V_j
        total = matrix.pow(2).sum()
        result[j] = float(torch.diagonal(matrix).pow(2).sum() / total) if total > 0 else float("nan")
    return result


def _block_stats(block: ResidualBlock, capture: BlockCapture, samples: list[dict[str, Any]]) -> BlockStats:
    values = torch.stack([sample["s"] for sample in samples])
    alignments = [sample["alignment"] for sample in samples if sample["alignment"] is not None]
    alignment = torch.stack(alignments).mean(0).tolist() if alignments else []

    def mean_of(key: str) -> float | None:
        kept = [sample[key] for sample in samples if sample[key] is not None]
        return sum(kept) / len(kept) if kept else None

    return BlockStats(
        name=block.name,
        family=block.family,
        kind=block.kind,
        alpha=block.alpha,
        dim=capture.input[0].numel(),
        method=samples[0]["method"],
        singular_values=values.mean(0).tolist(),
        singular_values_std=values.std(0, unbiased=False).tolist(),
        alignment=alignment,
        numerical_rank=float(sum(sample["rank"] for sample in samples) / len(samples)),
        rank_saturated=float(sum(sample["saturated"] for sample in samples) / len(samples)),
        ratio_after_c=mean_of("ratio"),
        energy_top_c=mean_of("energy"),
        frobenius_sq=mean_of("fro"),
    )


def _progress(progress: bool | Any, total: int) -> tuple[Any, bool]:
    """``(bar, owned)``: a new tqdm bar for ``progress=True``, the caller's object, or ``None``."""
    if progress is True:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="residual Jacobians (block x sample)", unit="jac"), True
    if progress:
        return progress, False
    return None, False


# ----------------------------------------------------------------------------------------- entry point


def load_model(
    model_id_or_path: str | os.PathLike, trust_remote_code: bool = False, **kwargs: Any
) -> nn.Module:
    """``transformers.AutoModel.from_pretrained`` with this package's decayed models registered.

    Importing :mod:`hf_resdecay` (done by importing this module) registers ``vit_mae_decay`` with the Auto
    classes, so decayed checkpoints resolve without remote code; ``trust_remote_code`` stays off unless
    the caller turns it on.
    """
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(model_id_or_path), trust_remote_code=trust_remote_code, **kwargs)


def _take(inputs: Any, count: int, batch: int) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs[:count] if inputs.ndim >= 1 and inputs.shape[0] == batch else inputs
    if isinstance(inputs, Mapping):
        return {key: _take(value, count, batch) for key, value in inputs.items()}
    return inputs


def _batch_size(inputs: torch.Tensor | Mapping[str, Any]) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    for key in ("pixel_values", "hidden_states", "sample", "input_ids"):
        value = inputs.get(key)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    first = next((value for value in inputs.values() if isinstance(value, torch.Tensor)), None)
    if first is None:
        raise ValueError("inputs must be a tensor or a mapping holding at least one tensor")
    return first.shape[0]


def run_alignment(
    model_or_id: nn.Module | str | os.PathLike,
    inputs: torch.Tensor | Mapping[str, Any],
    labels: torch.Tensor | Sequence[int] | None = None,
    samples: int = 32,
    top_k: int = 16,
    output_dir: str | os.PathLike = "alignment",
    *,
    trust_remote_code: bool = False,
    progress: bool | Any = True,
    metadata: Mapping[str, Any] | None = None,
    **analyze_kwargs: Any,
) -> AlignmentReport:
    """Analyse a model (object, Hub id or local folder) and write ``report.json`` and PNG plots.

    Args:
        model_or_id: a module, or a Hub id / directory loaded with :func:`load_model`.
        inputs: a batch (``pixel_values`` tensor, or a mapping of keyword inputs); the first ``samples``
            samples are analysed.
        labels: class of each sample in ``inputs`` (enables NC metrics and sets ``C``).
        samples: how many samples to analyse, ``>= 1`` (capped at the batch size).
        top_k: singular triplets per Jacobian.
        output_dir: created if needed; receives ``report.json``, ``spectra.png``, ``alignment.png``,
            ``trajectory.png`` and ``s1_vs_depth.png``.
        trust_remote_code: passed to ``from_pretrained`` when loading by id (off by default).
        progress: tqdm bar over (block, sample) pairs.
        metadata: extra JSON-ready entries recorded in ``report.settings`` (e.g. the dataset and split).
        analyze_kwargs: any other :func:`analyze` argument (``num_classes``, ``power_iters``, ``dtype``, ...).
    """
    from .plots import plot_report

    samples = _check_positive_int("samples", samples)
    model = model_or_id
    if not isinstance(model, nn.Module):
        analyze_kwargs.setdefault("model_name", str(model_or_id))
        model = load_model(model_or_id, trust_remote_code=trust_remote_code)
    batch = _batch_size(inputs)
    count = min(samples, batch)
    selected = _take(inputs, count, batch)
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.shape[0] != batch:
            raise ValueError(f"labels must hold one label per input sample ({batch}); got {labels.shape[0]}")
        labels = labels[:count]
    report = analyze(model, selected, labels, top_k, progress=progress, **analyze_kwargs)
    report.settings.update(metadata or {})
    output_dir = Path(output_dir)
    report.save_json(output_dir / "report.json")
    plot_report(report, output_dir)
    return report
