"""Pure metrics of residual alignment (arXiv 2401.09018) and neural collapse, on tensors or reports.

Each function reads its inputs and returns numbers: no model, hooks or Jacobians here (those live in
:mod:`hf_resdecay.alignment.analysis`, which calls these on what it measured).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .report import AlignmentReport, DepthScaling

__all__ = [
    "depth_scaling",
    "line_shape",
    "neural_collapse",
    "numerical_rank",
    "single_sample_note",
    "trajectory_stats",
]


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


def single_sample_note(labels: torch.Tensor | Sequence[int]) -> str | None:
    """Why NC1 of samples with these ``labels`` cannot be trusted, or ``None`` when every class has at least
    two: a class with a single sample shows no within-class variability, so NC1 is undefined when all
    classes have one and biased towards 0 when some have."""
    counts = torch.unique(torch.as_tensor(labels).reshape(-1), return_counts=True)[1]
    single = int((counts < 2).sum())
    if single == 0:
        return None
    verdict = "undefined" if single == counts.numel() else "unreliable (biased towards 0)"
    return (
        f"NC1 is {verdict}: {single} of {counts.numel()} classes have a single sample, and within-class "
        "variability needs at least 2 per class; analyse more samples"
    )


def neural_collapse(
    features: torch.Tensor,
    labels: torch.Tensor,
    classifier: nn.Module | None = None,
) -> dict[str, float | None]:
    """NC1-NC4 of ``features`` (``(N, d)``) with integer ``labels`` (``(N,)``, at least two classes).

    - ``nc1``: ``tr(Sigma_W Sigma_B^+) / C``, within-class variability relative to between-class (-> 0).
      A class needs two samples to show any variability: with one sample in every class NC1 is undefined
      (NaN, not the 0 the formula gives), with one in some classes it is biased low; both warn, and
      ``min_samples_per_class`` records the smallest class.
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
    counts = torch.stack([(labels == c).sum() for c in classes])
    note = single_sample_note(labels)
    if note is not None:
        warnings.warn(note, UserWarning, stacklevel=2)
    global_mean = features.mean(0)
    means = torch.stack([features[labels == c].mean(0) for c in classes])
    centred = means - global_mean
    within = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64)
    for index, c in enumerate(classes):
        diff = features[labels == c] - means[index]
        within += diff.T @ diff
    within /= features.shape[0]
    between = centred.T @ centred / classes.numel()
    if int(counts.max()) < 2:
        nc1 = float("nan")  # no class with two samples: no within-class variability to measure
    elif float(torch.trace(between)) <= 1e-12 * max(float(torch.trace(within)), 1e-300):
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
        "min_samples_per_class": int(counts.min()),
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
