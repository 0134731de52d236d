"""The PNG figures of an alignment report: written, readable, and showing something."""

import pytest
import torch
from PIL import Image

from hf_resdecay.alignment import (
    REPORT_PLOTS,
    AlignmentReport,
    analyze,
    plot_depth_scaling,
    plot_report,
)
from hf_resdecay.alignment.plots import _trajectory_figure

from .helpers import LinearResNet, mlp_block


def _report(depth: int, labels: bool = True, seed: int = 0) -> AlignmentReport:
    """A small fully-connected ResNet with decaying spectra: dense Jacobians, a few samples."""
    blocks = [mlp_block(12, 24, seed=seed + index, decay=0.6) for index in range(depth)]
    model = LinearResNet([torch.eye(12)] * depth)
    model.blocks = torch.nn.ModuleList(blocks)
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(6) % 3 if labels else None
    return analyze(model, x, y, top_k=5, blocks=list(model.blocks), model_name=f"mlp-resnet-{depth}")


def _check_png(path, min_width: int = 400) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width >= min_width and height >= 250
        pixels = image.convert("L")
        low, high = pixels.getextrema()
        assert high - low > 100  # dark lines or text on a light background, not a blank canvas
        assert len(pixels.getcolors(maxcolors=width * height)) > 20


@pytest.mark.parametrize("labels", [True, False])
def test_plot_report_writes_every_figure(tmp_path, labels):
    report = _report(4, labels=labels)
    paths = plot_report(report, tmp_path / "figures")
    assert [path.name for path in paths] == list(REPORT_PLOTS)
    for path in paths:
        _check_png(path)
    with Image.open(tmp_path / "figures" / "alignment.png") as image:
        assert image.size[0] > 1.8 * image.size[1]  # three heatmaps side by side


def test_plot_report_from_saved_json(tmp_path):
    """A report read back from JSON (NaNs saved as null) plots the same figures."""
    report = _report(3)
    report.coupling_diag_fraction[0][1] = None  # e.g. blocks of different widths: no product
    loaded = AlignmentReport.load_json(report.save_json(tmp_path / "report.json"))
    for path in plot_report(loaded, tmp_path):
        _check_png(path)


def test_plot_depth_scaling(tmp_path):
    reports = [_report(depth, seed=depth) for depth in (2, 4, 8)]
    path = plot_depth_scaling(reports, tmp_path / "scaling" / "depth.png")
    assert path == tmp_path / "scaling" / "depth.png"
    _check_png(path, min_width=300)
    with pytest.raises(ValueError, match="at least 2 different depths"):
        plot_depth_scaling([reports[0], _report(2, seed=5)], tmp_path / "never.png")
    assert not (tmp_path / "never.png").exists()


def _legend_texts(axis) -> list[str]:
    legend = axis.get_legend()
    assert legend is not None, axis.get_title()
    return [text.get_text() for text in legend.get_texts()]


def test_trajectory_figure_has_legends_for_marks_and_classes():
    own, shared = _trajectory_figure(_report(3)).axes[:2]  # labels 0, 1, 2
    assert _legend_texts(own) == ["path h_0 -> h_L", "block outputs (colour: depth)"]
    assert _legend_texts(shared) == ["h_0 (input)", "h_L (last block)", "class 0", "class 1", "class 2"]
    legend_colours = [line.get_color() for line in shared.get_legend().get_lines()[2:]]
    path_colours = {tuple(line.get_color()) for line in shared.get_lines()[::3]}  # one path line per sample
    assert {tuple(colour) for colour in legend_colours} == path_colours  # the legend's colours are the paths'

    unlabelled = _trajectory_figure(_report(3, labels=False)).axes[1]
    assert _legend_texts(unlabelled)[2:] == ["sample path (no labels)"]

    many = _report(2)
    many.labels = list(range(12))
    many.trajectory_pca = many.trajectory_pca * 2
    assert _legend_texts(_trajectory_figure(many).axes[1])[2:] == ["colour: class (12 classes)"]
