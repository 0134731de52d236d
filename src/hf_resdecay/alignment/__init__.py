"""Residual alignment (arXiv 2401.09018): Jacobian SVDs of residual branches and the RA1-RA4 diagnostics.

Modules, each importing only those above it: ``blocks`` and ``jacobian`` (residual branches and their
Jacobians), ``report`` (result types), ``metrics`` (pure functions), ``analysis`` (:func:`analyze`), ``plots``
(PNG figures; matplotlib is imported only when drawing) and ``command`` (:func:`run_alignment` and
``hf-resdecay align``).
"""

from ..evaluation.features import load_model
from .analysis import analyze
from .blocks import (
    BlockCapture,
    DiscoveredBlocks,
    ResidualBlock,
    SkippedBlock,
    capture_block_inputs,
    discover_residual_blocks,
    vit_mae_inputs,
)
from .command import run_alignment
from .jacobian import (
    JacobianSVD,
    analysis_attention,
    dense_jacobian_bytes,
    hutchinson_frobenius_sq,
    jacobian_matvec,
    jacobian_rmatvec,
    residual_jacobian_svd,
)
from .metrics import depth_scaling, line_shape, neural_collapse, numerical_rank, trajectory_stats
from .plots import (
    REPORT_PLOTS,
    plot_alignment,
    plot_depth_scaling,
    plot_report,
    plot_s1_vs_depth,
    plot_spectra,
    plot_trajectory,
)
from .report import AlignmentReport, BlockStats, DepthScaling

__all__ = [
    "REPORT_PLOTS",
    "AlignmentReport",
    "BlockCapture",
    "BlockStats",
    "DepthScaling",
    "DiscoveredBlocks",
    "JacobianSVD",
    "ResidualBlock",
    "SkippedBlock",
    "analysis_attention",
    "analyze",
    "capture_block_inputs",
    "dense_jacobian_bytes",
    "depth_scaling",
    "discover_residual_blocks",
    "hutchinson_frobenius_sq",
    "jacobian_matvec",
    "jacobian_rmatvec",
    "line_shape",
    "load_model",
    "neural_collapse",
    "numerical_rank",
    "plot_alignment",
    "plot_depth_scaling",
    "plot_report",
    "plot_s1_vs_depth",
    "plot_spectra",
    "plot_trajectory",
    "residual_jacobian_svd",
    "run_alignment",
    "trajectory_stats",
    "vit_mae_inputs",
]
