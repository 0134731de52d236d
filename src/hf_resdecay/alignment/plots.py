"""PNG figures of an :class:`~hf_resdecay.alignment.AlignmentReport`, readable at a glance.

Matplotlib is imported inside the plotting functions and draws on its Agg canvas directly (no pyplot
figure manager), so importing this module needs no matplotlib and never changes a notebook's backend. Every
figure has a title naming the model, labelled axes and, for heatmaps, a colorbar with a fixed ``[0, 1]``
range so that two reports compare by eye.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import save_figure_atomic
from ..evaluation.plots import new_figure
from .metrics import depth_scaling
from .report import AlignmentReport

__all__ = [
    "REPORT_PLOTS",
    "plot_alignment",
    "plot_depth_scaling",
    "plot_report",
    "plot_s1_vs_depth",
    "plot_spectra",
    "plot_trajectory",
]


REPORT_PLOTS = ("spectra.png", "alignment.png", "trajectory.png", "s1_vs_depth.png")
"""File names :func:`plot_report` writes, in order."""


def _depth_colors(count: int) -> Any:
    """A viridis colour scale over block indices ``0 .. count - 1``, usable as a colorbar."""
    from matplotlib import cm, colors

    norm = colors.Normalize(vmin=0, vmax=max(count - 1, 1))
    return cm.ScalarMappable(norm=norm, cmap="viridis")


def plot_spectra(report: AlignmentReport, path: str | os.PathLike) -> Path:
    """Mean top-``k`` singular values of each block's residual Jacobian (log scale), coloured by depth.

    Under RA3 the curves drop sharply after index ``C`` (dashed line).
    """
    figure, axis = new_figure((7, 4.5))
    mapper = _depth_colors(report.num_blocks)
    for index, block in enumerate(report.blocks):
        ranks = range(1, len(block.singular_values) + 1)
        values = [max(value, 1e-12) for value in block.singular_values]
        axis.plot(ranks, values, marker="o", markersize=3, color=mapper.to_rgba(index), linewidth=1.2)
    if report.num_classes and report.num_classes < report.top_k:
        axis.axvline(
            report.num_classes + 0.5, color="grey", linestyle="--", label=f"C = {report.num_classes}"
        )
        axis.legend(loc="upper right")
    axis.set_yscale("log")
    axis.set_xlabel("singular value index i")
    axis.set_ylabel("singular value s_i of the branch Jacobian")
    axis.set_title(f"{report.model}: residual Jacobian spectra ({report.num_samples} samples, mean)")
    axis.grid(True, which="both", alpha=0.3)
    colorbar = figure.colorbar(mapper, ax=axis)
    colorbar.set_label("block index (depth)")
    return save_figure_atomic(figure, path)


def plot_alignment(report: AlignmentReport, path: str | os.PathLike) -> Path:
    """RA2 heatmaps: ``|<u_i, v_i>|`` per block, cross-depth diagonal fraction, top-K subspace overlap."""
    figure, axes = new_figure((16, 4.8), 1, 3)
    panels = [
        (
            [block.alignment for block in report.blocks],
            "within-Jacobian alignment |<u_i, v_i>|",
            "singular vector index i",
            "block",
        ),
        (
            report.coupling_diag_fraction,
            f"diagonal energy of U_j^T J_i V_j (top {report.coupling_k})",
            "block j (singular vectors)",
            "block i (Jacobian)",
        ),
        (
            report.subspace_overlap,
            f"top-{report.coupling_k} left subspace overlap",
            "block j",
            "block i",
        ),
    ]
    for axis, (matrix, title, xlabel, ylabel) in zip(axes, panels, strict=True):
        data = [[math.nan if value is None else value for value in row] for row in matrix]
        width = max((len(row) for row in data), default=1)
        data = [row + [math.nan] * (width - len(row)) for row in data]
        image = axis.imshow(data, vmin=0.0, vmax=1.0, cmap="magma", aspect="auto", interpolation="nearest")
        axis.set_title(title, fontsize=10)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    figure.suptitle(f"{report.model}: residual alignment (RA2)")
    return save_figure_atomic(figure, path)


def plot_trajectory(report: AlignmentReport, path: str | os.PathLike) -> Path:
    """RA1: one sample's path ``h_0 .. h_L`` in its own 2-D PCA, and all samples in a shared PCA."""
    return save_figure_atomic(_trajectory_figure(report), path)


_MAX_CLASS_ENTRIES = 10
"""Classes named one by one in the trajectory legend; beyond, one entry says the colour is the class."""


def _trajectory_figure(report: AlignmentReport) -> Any:
    """The figure of :func:`plot_trajectory`; each panel has a legend saying what its marks are."""
    from matplotlib import cm, colors
    from matplotlib.lines import Line2D

    figure, (own, shared) = new_figure((13, 5.2), 1, 2)
    points = report.sample_trajectory_pca
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        own.plot(xs, ys, "-", color="grey", linewidth=1, label="path h_0 -> h_L")
        scatter = own.scatter(
            xs, ys, c=range(len(points)), cmap="viridis", zorder=3, label="block outputs (colour: depth)"
        )
        own.annotate("h_0", (xs[0], ys[0]), textcoords="offset points", xytext=(5, 5))
        own.annotate(f"h_{len(points) - 1}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(5, 5))
        figure.colorbar(scatter, ax=own, label="depth (block output index)")
        own.legend(loc="best", fontsize=8)
    own.set_title(f"sample 0, line shape {report.ra1['line_shape_per_sample'][0]:.3f} (1 = straight)")
    own.set_xlabel("PC 1")
    own.set_ylabel("PC 2")
    own.axis("equal")
    labels = report.labels or [0] * len(report.trajectory_pca)
    label_norm = colors.Normalize(vmin=min(labels), vmax=max(max(labels), min(labels) + 1))
    for label, path_points in zip(labels, report.trajectory_pca, strict=False):
        xs, ys = [p[0] for p in path_points], [p[1] for p in path_points]
        color = cm.tab10(label_norm(label)) if report.labels else "tab:blue"
        shared.plot(xs, ys, "-", color=color, linewidth=0.8, alpha=0.8)
        shared.plot(xs[-1:], ys[-1:], "o", color=color, markersize=3)
        shared.plot(xs[:1], ys[:1], "x", color="black", markersize=3)
    handles = [
        Line2D([], [], marker="x", color="black", linestyle="none", markersize=5, label="h_0 (input)"),
        Line2D([], [], marker="o", color="grey", linestyle="none", markersize=4, label="h_L (last block)"),
    ]
    classes = sorted(set(report.labels or []))
    if report.labels and len(classes) <= _MAX_CLASS_ENTRIES:
        handles += [Line2D([], [], color=cm.tab10(label_norm(c)), label=f"class {c}") for c in classes]
    elif report.labels:
        handles.append(Line2D([], [], color="grey", label=f"colour: class ({len(classes)} classes)"))
    else:
        handles.append(Line2D([], [], color="tab:blue", label="sample path (no labels)"))
    shared.legend(handles=handles, loc="best", fontsize=8, ncol=2 if len(handles) > 6 else 1)
    shared.set_title(f"all {report.num_samples} samples")
    shared.set_xlabel("PC 1 (shared)")
    shared.set_ylabel("PC 2 (shared)")
    segment = report.ra1.get("segment", ["", ""])
    figure.suptitle(
        f"{report.model}: representation trajectories (RA1), blocks {segment[0]} .. {segment[1]}; "
        f"mean line shape {report.ra1.get('line_shape', math.nan):.3f}, "
        f"PC1 share {report.ra1.get('pc1_share', math.nan):.3f}"
    )
    return figure


def plot_s1_vs_depth(report: AlignmentReport, path: str | os.PathLike) -> Path:
    """RA4 within a model: mean top singular value per block, with its spread over samples."""
    figure, axis = new_figure((7, 4.5))
    index = list(range(report.num_blocks))
    means = [block.singular_values[0] for block in report.blocks]
    spread = [block.singular_values_std[0] for block in report.blocks]
    axis.errorbar(index, means, yerr=spread, marker="o", capsize=3)
    axis.set_xlabel("block index (depth)")
    axis.set_ylabel("top singular value s_1 (mean +- std over samples)")
    axis.set_title(f"{report.model}: s_1 against depth (RA4), {report.num_blocks} blocks")
    axis.grid(True, alpha=0.3)
    return save_figure_atomic(figure, path)


def plot_depth_scaling(reports: Sequence[AlignmentReport], path: str | os.PathLike) -> Path:
    """RA4 across models: mean ``s_1`` against total depth on log-log axes, with the fitted slope."""
    fit = depth_scaling(reports)
    figure, axis = new_figure((6.5, 4.5))
    axis.loglog(fit.depths, fit.s1, "o", label="models")
    low, high = min(fit.depths), max(fit.depths)
    xs = [low * (high / low) ** (t / 20) for t in range(21)]
    ys = [math.exp(fit.intercept) * x**fit.slope for x in xs]
    axis.loglog(xs, ys, "--", label=f"fit: slope {fit.slope:.2f} (R^2 {fit.r2:.2f})")
    axis.set_xlabel("number of residual blocks L")
    axis.set_ylabel("mean top singular value s_1")
    axis.set_title("RA4: s_1 against depth across models (slope -1 means s_1 ~ 1/L)")
    axis.legend()
    axis.grid(True, which="both", alpha=0.3)
    return save_figure_atomic(figure, path)


def plot_report(report: AlignmentReport, output_dir: str | os.PathLike) -> list[Path]:
    """All single-report figures into ``output_dir``: spectra, alignment, trajectory and s_1 PNGs."""
    output_dir = Path(output_dir)
    functions = (plot_spectra, plot_alignment, plot_trajectory, plot_s1_vs_depth)
    return [
        function(report, output_dir / name) for function, name in zip(functions, REPORT_PLOTS, strict=True)
    ]
