"""Coefficient schedules for decayed identity shortcuts (arXiv 2404.10947).

A decayed residual sublayer computes ``x = alpha_k * x + f(LN(x))``. The coefficients run over the
*sublayers* of a stack (attention and MLP counted separately) and fall from 1 at the first sublayer to
``alpha_min = 1 - shortcut_decay`` at the last, as in the authors' released code.

This module is pure Python on purpose: checkpoints saved by the package ship a copy of it next to
their modeling code, so that ``trust_remote_code=True`` works where ``hf_resdecay`` is not installed.
"""

from __future__ import annotations

import math
import numbers
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

SHORTCUT_SCHEDULES: tuple[str, ...] = ("linear", "cosine", "constant")
"""Names accepted by :func:`shortcut_coefficients`; ``"linear"`` is the paper's schedule."""


def validate_shortcut_decay(shortcut_decay: float) -> float:
    """Return ``shortcut_decay`` as a float, or raise ``ValueError`` unless it lies in ``[0, 1)``."""
    if isinstance(shortcut_decay, bool) or not isinstance(shortcut_decay, numbers.Real):
        raise ValueError(
            f"shortcut_decay must be a real number in [0, 1) (1 - alpha_min); got {shortcut_decay!r}"
        )
    value = float(shortcut_decay)
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"shortcut_decay must be in [0, 1) (it is 1 - alpha_min; 0 means standard residuals, "
            f"the paper uses 0.3-0.4 for MAE and 0.2 for diffusion); got {shortcut_decay!r}"
        )
    return value


def validate_shortcut_schedule(schedule: str) -> str:
    """Return ``schedule``, or raise ``ValueError`` unless it is one of :data:`SHORTCUT_SCHEDULES`."""
    if schedule not in SHORTCUT_SCHEDULES:
        allowed = ", ".join(repr(name) for name in SHORTCUT_SCHEDULES)
        raise ValueError(f"shortcut_schedule must be one of {allowed}; got {schedule!r}")
    return schedule


def _linear(k: int, last: int, decay: float) -> float:
    """The paper's schedule: straight line from 1 down to ``1 - decay``."""
    return 1.0 - decay * k / last


def _cosine(k: int, last: int, decay: float) -> float:
    """Half-cosine from 1 down to ``1 - decay``: decays slowly at both ends, fastest mid-depth."""
    return 1.0 - decay * 0.5 * (1.0 - math.cos(math.pi * k / last))


def _constant(k: int, last: int, decay: float) -> float:
    """Every sublayer, the first included, uses ``1 - decay`` (the ablation reviewers asked for)."""
    return 1.0 - decay


_SCHEDULE_FUNCTIONS = {"linear": _linear, "cosine": _cosine, "constant": _constant}


def shortcut_coefficients(num_sublayers: int, shortcut_decay: float, schedule: str = "linear") -> list[float]:
    """Shortcut coefficients ``alpha_0 .. alpha_{n-1}`` for ``n = num_sublayers`` residual sublayers.

    - ``"linear"`` (the paper, released-code form): ``alpha_k = 1 - shortcut_decay * k / (n - 1)``, so the
      first sublayer keeps ``alpha = 1`` exactly and the last has ``alpha_min = 1 - shortcut_decay``.
    - ``"cosine"``: ``alpha_k = alpha_min + (1 - alpha_min) * (1 + cos(pi * k / (n - 1))) / 2``, same end
      points as ``"linear"``, monotone, flatter near the input and the output.
    - ``"constant"``: ``alpha_k = alpha_min`` for every sublayer.

    ``n = 1`` gives ``[1.0]`` for the two decaying schedules (a single sublayer sits at depth 0).
    A transformer encoder of ``depth`` blocks has ``n = 2 * depth`` sublayers.
    """
    if (
        isinstance(num_sublayers, bool)
        or not isinstance(num_sublayers, numbers.Integral)
        or num_sublayers < 1
    ):
        raise ValueError(f"num_sublayers must be an integer >= 1; got {num_sublayers!r}")
    decay = validate_shortcut_decay(shortcut_decay)
    function = _SCHEDULE_FUNCTIONS[validate_shortcut_schedule(schedule)]
    if num_sublayers == 1:
        return [1.0 - decay] if schedule == "constant" else [1.0]
    last = num_sublayers - 1
    return [function(k, last, decay) for k in range(num_sublayers)]


def alpha_eff(coefficients: Sequence[float]) -> float:
    """Product of all shortcut coefficients: how much of the input survives through the identity path.

    The paper reports a useful range of about 1e-3 to 1e-2 for MAE encoders.
    """
    return math.prod(coefficients)


def ship_code_files(save_directory: str | os.PathLike, *module_names: str) -> None:
    """Copy the source files of ``module_names`` and of this module into ``save_directory``: the code a
    checkpoint carries so that ``trust_remote_code=True`` loads it where this package is not installed
    (each model file imports this module from beside itself in that case)."""
    Path(save_directory).mkdir(parents=True, exist_ok=True)
    for name in (*module_names, __name__):
        source = Path(sys.modules[name].__file__)
        shutil.copyfile(source, Path(save_directory) / source.name)
