"""Atomic file writes: results, cards, caches and plots appear whole under their final name or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _create_partial(path: Path) -> tuple[int, str]:
    """A new, exclusively created temporary file next to ``path``: ``(descriptor, name)``.

    Created with mode 0o666 so that the process umask decides the permissions, as for any ``open(path, "w")``
    (``tempfile.mkstemp`` would force 0o600); when ``path`` exists its permission bits are copied instead, so
    replacing a file never changes who may read it.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        name = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.partial")
        try:
            descriptor = os.open(name, flags, 0o666)
        except FileExistsError:
            continue
        break
    try:
        existing = os.stat(path)
    except OSError:
        return descriptor, name
    try:
        os.chmod(name, stat.S_IMODE(existing.st_mode))
    except BaseException:
        os.close(descriptor)
        Path(name).unlink(missing_ok=True)
        raise
    return descriptor, name


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; rename it onto ``path`` when the block succeeds.

    On any error (or an interrupt) the temporary file is removed and ``path`` keeps its previous content, so
    a reader never sees half a file. ``mode`` is ``"w"`` (text, UTF-8) or ``"wb"``. A new file gets the
    permissions the umask allows; a replaced file keeps its permission bits.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb'; got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = _create_partial(path)
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
