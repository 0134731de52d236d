"""The result types of a residual-alignment analysis: per-block statistics, the report, the depth fit.

They hold plain numbers and lists only (no tensors), so a report round-trips through JSON and can be
plotted or compared without the model that produced it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..atomic import write_json_atomic

__all__ = ["AlignmentReport", "BlockStats", "DepthScaling"]


@dataclass
class BlockStats:
    """Per-block results, averaged over the analysed samples."""

    name: str
    family: str
    kind: str
    alpha: float
    """Identity coefficient of the whole block, subtracted from it to get its branch: for a block of two
    decayed sublayers, the product of ``sublayer_alphas``."""
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
    sublayer_alphas: list[float] = field(default_factory=list)
    """Shortcut coefficients of the block's sublayers (attention, MLP), the per-sublayer schedule of the
    model card; empty for blocks without decayed sublayers."""

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
    notes: list[str] = field(default_factory=list)
    """Caveats on the figures (e.g. NC1 from classes with a single sample); ``hf-resdecay align`` prints
    them."""

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


@dataclass
class DepthScaling:
    """RA4 across models: fit of ``log s_1 = intercept + slope * log L`` (``slope ~ -1`` under RA4)."""

    depths: list[int]
    s1: list[float]
    slope: float
    intercept: float
    r2: float
