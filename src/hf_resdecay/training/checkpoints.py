"""Crash-safe checkpoints: written to a partial folder and renamed, resumed from the newest intact one.

A checkpoint holds Accelerate's model and optimizer state and, in the package's own format, the state of
the objects a script names (lr schedule, EMA): tensors in safetensors files and everything else in JSON, so
resuming never unpickles code. Accelerate's pickled RNG states are deleted when the checkpoint is written
(every random draw of a step comes from :func:`~hf_resdecay.training.runtime.step_rng`, so they are not
needed), and a checkpoint that holds any ``.pkl`` file is refused. ``manifest.json`` records the size of
every file, so a truncated or emptied checkpoint is recognised before it is read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from .distributed import is_dtensor, local_tensor

CHECKPOINT_PREFIX = "checkpoint-"
_PARTIAL = ".partial"
LOOP_STATE = "loop_state.json"
"""Where the training loop stood when a checkpoint was written (JSON)."""
MANIFEST = "manifest.json"
"""The size of every other file of a checkpoint (JSON), written last: what an intact checkpoint holds."""
_STATE_PREFIX = "state-"
_TENSOR = "__tensor__"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: incomplete, truncated, unsafe or made for another model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holding pickle files: refused, never skipped over, since someone planted or kept them."""


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


def _files(path: Path) -> dict[str, int]:
    return {
        item.relative_to(path).as_posix(): item.stat().st_size
        for item in sorted(path.rglob("*"))
        if item.is_file() and item.name != MANIFEST
    }


def check_checkpoint(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` naming ``path`` and the problem unless it is an intact checkpoint:
    its manifest readable, every file it lists present with its recorded size, no pickle file."""
    path = Path(path)
    pickles = sorted(item.relative_to(path).as_posix() for item in path.rglob("*.pkl"))
    if pickles:
        raise UnsafeCheckpointError(
            f"checkpoint {path} holds pickle files ({', '.join(pickles)}), which could run code when "
            "loaded: they are never unpickled; resume from a checkpoint written by this version"
        )
    try:
        recorded = dict(json.loads((path / MANIFEST).read_text()))
    except (OSError, ValueError, TypeError):
        raise CheckpointError(
            f"checkpoint {path} is incomplete ({MANIFEST} missing or unreadable): resume from another one"
        ) from None
    found = _files(path)
    for name, size in recorded.items():
        if found.get(name) != size:
            what = "missing" if name not in found else f"{found[name]} bytes, not {size}"
            raise CheckpointError(
                f"checkpoint {path} is truncated ({name}: {what}): resume from another checkpoint"
            )


def resolve_resume(folder: str | os.PathLike, resume_from: str | None) -> Path | None:
    """``resume_from`` as a checkpoint path: ``"latest"`` picks the newest intact one in ``folder``, saying
    which damaged newer ones it passed over (None if none); a path must be an intact checkpoint."""
    if not resume_from:
        return None
    if resume_from == "latest":
        for path in reversed(checkpoint_dirs(folder)):
            try:
                check_checkpoint(path)
            except UnsafeCheckpointError:
                raise
            except CheckpointError as error:
                print(f"skipping {path.name}: {error}", flush=True)
                continue
            return path
        return None
    path = Path(resume_from)
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint {resume_from}: no such checkpoint directory")
    checkpoint_step(path)
    check_checkpoint(path)
    return path


def _split_state(value, tensors: dict[str, torch.Tensor], key: str):
    """``value`` (a state dict) as JSON, its tensors moved into ``tensors`` under their path."""
    if isinstance(value, torch.Tensor):
        tensors[key] = local_tensor(value).detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(value, Mapping):
        return {str(name): _split_state(item, tensors, f"{key}.{name}") for name, item in value.items()}
    if isinstance(value, list | tuple):
        return [_split_state(item, tensors, f"{key}.{index}") for index, item in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot save {type(value).__name__} at {key} in a checkpoint (tensors and JSON only)")


def _join_state(value, saved: dict[str, torch.Tensor], current, where: str):
    """The state dict ``value`` describes, its tensors copied into the object's own ``current`` tensors
    (same devices, and the same sharded tensors under FSDP)."""
    if isinstance(value, dict) and set(value) == {_TENSOR}:
        key = value[_TENSOR]
        if not isinstance(current, torch.Tensor):
            raise CheckpointError(f"checkpoint {where} has a tensor {key} that this run does not have")
        local = local_tensor(current)
        if local.shape != saved[key].shape:
            raise CheckpointError(
                f"checkpoint {where}: {key} has shape {tuple(saved[key].shape)}, this run "
                f"{tuple(local.shape)}: it was written for another model or settings"
            )
        with torch.no_grad():
            local.copy_(saved[key])
        return current
    if isinstance(value, dict):
        current = current if isinstance(current, Mapping) else {}
        return {name: _join_state(item, saved, current.get(name), where) for name, item in value.items()}
    if isinstance(value, list):
        current = list(current) if isinstance(current, list | tuple) else []
        if current and len(current) != len(value):
            raise CheckpointError(f"checkpoint {where} holds {len(value)} tensors, this run {len(current)}")
        return [
            _join_state(item, saved, current[index] if index < len(current) else None, where)
            for index, item in enumerate(value)
        ]
    return value


def _is_sharded(state) -> bool:
    if isinstance(state, Mapping):
        return any(_is_sharded(item) for item in state.values())
    if isinstance(state, list | tuple):
        return any(_is_sharded(item) for item in state)
    return is_dtensor(state)


def _tensor_file(name: str, sharded: bool, rank: int) -> str:
    suffix = f"-rank{rank}" if sharded else ""
    return f"{_STATE_PREFIX}{name}{suffix}.safetensors"


def _save_states(accelerator, folder: Path, states: Mapping[str, object]) -> None:
    """Every process: each object's ``state_dict()`` as JSON (main process) and safetensors (the main
    process, or every process for its own slices of sharded tensors)."""
    from safetensors.torch import save_file

    for name, obj in states.items():
        state = obj.state_dict()
        sharded = _is_sharded(state)
        tensors: dict[str, torch.Tensor] = {}
        described = _split_state(state, tensors, name)
        if accelerator.is_main_process:
            text = json.dumps({"sharded": sharded, "state": described})
            (folder / f"{_STATE_PREFIX}{name}.json").write_text(text)
        if tensors and (sharded or accelerator.is_main_process):
            save_file(tensors, folder / _tensor_file(name, sharded, accelerator.process_index))


def _load_states(accelerator, folder: Path, states: Mapping[str, object]) -> None:
    from safetensors.torch import load_file

    for name, obj in states.items():
        try:
            described = json.loads((folder / f"{_STATE_PREFIX}{name}.json").read_text())
        except (OSError, ValueError):
            raise CheckpointError(
                f"checkpoint {folder} has no readable {_STATE_PREFIX}{name}.json: written by another version "
                "or for other settings"
            ) from None
        tensor_file = folder / _tensor_file(name, described["sharded"], accelerator.process_index)
        saved = load_file(tensor_file) if tensor_file.exists() else {}
        obj.load_state_dict(_join_state(described["state"], saved, obj.state_dict(), str(folder)))


def save_checkpoint(
    accelerator,
    folder: str | os.PathLike,
    step: int,
    keep: int | None = None,
    position: dict | None = None,
    states: Mapping[str, object] | None = None,
) -> Path:
    """``accelerator.save_state`` (model, optimizer) and ``states`` (objects with ``state_dict``, saved as
    safetensors + JSON) into a partial directory, then rename it: a kill leaves no half checkpoint.

    ``position`` (JSON: where the loop stands in its data, e.g. epoch and batches read) is written beside the
    state as :data:`LOOP_STATE`, and the size of every file as :data:`MANIFEST`. Every process must call
    this. Keeps the newest ``keep`` checkpoints.
    """
    folder = Path(folder)
    target = folder / f"{CHECKPOINT_PREFIX}{step}"
    partial = folder / f"{CHECKPOINT_PREFIX}{step}{_PARTIAL}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    _save_states(accelerator, partial, states or {})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for pickled in partial.rglob("*.pkl"):  # Accelerate's RNG states: not needed, never loaded
            pickled.unlink()
        (partial / LOOP_STATE).write_text(json.dumps({"step": step, **(position or {})}))
        (partial / MANIFEST).write_text(json.dumps(_files(partial)))
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


def resume_state(
    accelerator,
    folder: str | os.PathLike,
    resume_from: str | None,
    states: Mapping[str, object] | None = None,
) -> tuple[int, dict]:
    """Clear half-written checkpoints, load the one ``resume_from`` names (``latest``: the newest intact
    one; or a path) into ``accelerator`` and ``states``, and return its step and the loop position saved
    with it (``(0, {})`` when there is nothing to resume, saying so for ``latest``).

    Raises :class:`CheckpointError` (a ``ValueError``) naming the checkpoint when it is damaged, holds pickle
    files, or does not fit the model.
    """
    if accelerator.is_main_process:
        remove_partial_checkpoints(folder)
    accelerator.wait_for_everyone()
    path = resolve_resume(folder, resume_from)
    if path is None:
        if resume_from == "latest":
            accelerator.print(f"no checkpoint in {folder}: starting from step 0")
        return 0, {}
    try:
        accelerator.load_state(str(path))
    except CheckpointError:
        raise
    except Exception as error:  # safetensors, torch and shape errors come in many types
        detail = " ".join(str(error).split())[:300]
        raise CheckpointError(
            f"checkpoint {path} does not fit this run ({type(error).__name__}: {detail}): was it written for "
            "another model or settings?"
        ) from error
    _load_states(accelerator, path, states or {})
    accelerator.print(f"resumed from {path} (step {checkpoint_step(path)})")
    position = json.loads((path / LOOP_STATE).read_text())
    position.pop("step", None)
    return checkpoint_step(path), position
