"""Depth curves of an evaluation as one PNG, and the pyplot-free figure the package's plots draw on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..atomic import save_figure_atomic


def new_figure(
    figsize: tuple[float, float], nrows: int = 1, ncols: int = 1, squeeze: bool = True
) -> tuple[Any, Any]:
    """A matplotlib figure on the Agg canvas and its axes, without pyplot: the caller's backend is kept."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(nrows, ncols, squeeze=squeeze)


def plot_depth_curves(results: dict, path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw kNN top-1 and effective rank per layer (the ones present in ``results``) into ``path`` (PNG)."""
    panels = [("knn", "kNN top-1 accuracy (%)"), ("effective_rank", "effective rank (RankMe)")]
    panels = [(key, label) for key, label in panels if key in results]
    if not panels:
        raise ValueError("results hold no per-layer metric to plot (need 'knn' or 'effective_rank')")
    layers = results["layers"]
    figure, axes = new_figure((5.5 * len(panels), 4), 1, len(panels), squeeze=False)
    for axis, (key, label) in zip(axes[0], panels, strict=True):
        values = results[key]["top1"] if key == "knn" else results[key]["values"]
        axis.plot(layers, values, marker="o")
        axis.set_xlabel("layer (0 = embeddings, i = output of block i)")
        axis.set_ylabel(label)
        axis.set_xticks(layers)
        axis.grid(alpha=0.3)
    figure.suptitle(title or "representation quality against depth")
    figure.tight_layout()
    return save_figure_atomic(figure, path)
