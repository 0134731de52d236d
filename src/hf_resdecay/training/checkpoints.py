"""Crash-safe checkpoints: written to a partial folder and renamed, resumed from the newest complete one."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

CHECKPOINT_PREFIX = "checkpoint-"
_PARTIAL = ".partial"
LOOP_STATE = "loop_state.json"
"""Where the training loop stood when a checkpoint was written (JSON)."""


def checkpoint_dirs(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``folder`` (``checkpoint-<step>``), oldest first; partial ones are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", path.name)]
    return sorted(found, key=lambda path: int(path.name[len(CHECKPOINT_PREFIX) :]))


def checkpoint_step(path: str | os.PathLike) -> int:
    """The optimisation step a checkpoint directory was written after."""
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", Path(path).name)
    if match is None:
        raise ValueError(
            f"{path} is not a checkpoint directory (expected a name like {CHECKPOINT_PREFIX}500)"
        )
    return int(match.group(1))


def resolve_resume(folder: str | os.PathLike, resume_from: str | None) -> Path | None:
    """``resume_from`` as a checkpoint path: ``"latest"`` picks the newest complete one (None if none)."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = checkpoint_dirs(folder)
        return found[-1] if found else None
    path = Path(resume_from)
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint {resume_from}: no such checkpoint directory")
    checkpoint_step(path)
    return path


def save_checkpoint(
    accelerator,
    folder: str | os.PathLike,
    step: int,
    keep: int | None = None,
    position: dict | None = None,
) -> Path:
    """``accelerator.save_state`` into a partial directory, then rename it: a kill leaves no half checkpoint.

    ``position`` (JSON: where the loop stands in its data, e.g. epoch and batches read) is written beside the
    state as :data:`LOOP_STATE`. Every process must call this (each saves its own RNG state). Keeps the newest
    ``keep`` checkpoints.
    """
    folder = Path(folder)
    target = folder / f"{CHECKPOINT_PREFIX}{step}"
    partial = folder / f"{CHECKPOINT_PREFIX}{step}{_PARTIAL}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / LOOP_STATE).write_text(json.dumps({"step": step, **(position or {})}))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
        if keep is not None:
            for old in checkpoint_dirs(folder)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def remove_partial_checkpoints(folder: str | os.PathLike) -> None:
    """Delete checkpoint directories a killed run left half-written."""
    for path in Path(folder).glob(f"{CHECKPOINT_PREFIX}*{_PARTIAL}"):
        shutil.rmtree(path, ignore_errors=True)


def resume_state(accelerator, folder: str | os.PathLike, resume_from: str | None) -> tuple[int, dict]:
    """Clear half-written checkpoints, load the one ``resume_from`` names (``latest`` or a path) into
    ``accelerator``, and return its step and the loop position saved with it (``(0, {})`` when there is
    nothing to resume; ``{}`` for checkpoints written before positions were saved)."""
    if accelerator.is_main_process:
        remove_partial_checkpoints(folder)
    accelerator.wait_for_everyone()
    path = resolve_resume(folder, resume_from)
    if path is None:
        return 0, {}
    accelerator.load_state(str(path))
    accelerator.print(f"resumed from {path} (step {checkpoint_step(path)})")
    saved = path / LOOP_STATE
    position = json.loads(saved.read_text()) if saved.exists() else {}
    position.pop("step", None)
    return checkpoint_step(path), position
