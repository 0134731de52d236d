"""Atomic file writes: results, cards, caches and plots appear whole under their final name or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; rename it onto ``path`` when the block succeeds.

    On any error (or an interrupt) the temporary file is removed and ``path`` keeps its previous content, so
    a reader never sees half a file. ``mode`` is ``"w"`` (text, UTF-8) or ``"wb"``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb'; got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(descriptor, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as handle:
            yield handle
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_figure_atomic(figure: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG through :func:`atomic_write`, then close it; returns the path."""
    import matplotlib.pyplot as plt

    try:
        with atomic_write(path, "wb") as handle:
            figure.savefig(handle, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(figure)
    return Path(path)


def write_json_atomic(data: Any, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented JSON through :func:`atomic_write`; returns the path."""
    with atomic_write(path) as handle:
        json.dump(data, handle, indent=2)
    return Path(path)
