"""``evaluate`` modules over the evaluation library, one folder each.

``evaluate.load(metric_path("knn_accuracy"))`` loads one offline. The modules are thin wrappers: the
computation lives in :mod:`hf_resdecay.evaluation`, so both routes give the same numbers.
"""

from __future__ import annotations

from pathlib import Path

METRICS = ("knn_accuracy", "linear_probe_accuracy", "frechet_distance")


def metric_path(name: str) -> str:
    """Folder of the ``evaluate`` module ``name``, to pass to ``evaluate.load``."""
    if name not in METRICS:
        raise ValueError(f"name must be one of {', '.join(METRICS)}; got {name!r}")
    return str(Path(__file__).parent / name)


__all__ = ["METRICS", "metric_path"]
