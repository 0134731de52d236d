"""Pieces shared by the training scripts: their common arguments and data loading, reproducible randomness,
crash-safe checkpoints and outputs, a stop at the first non-finite loss, optimiser parameter groups, metric
logs, and Hub uploads that retry.

Reproducibility across a kill and a resume rests on two choices. Every random draw of an optimisation step
(augmentation, masking, dropout) comes from a generator seeded by ``(seed, rank, step, micro-batch)``
(:func:`step_rng`), so it does not depend on what ran before; and the data order comes from Accelerate's
seedable sampler (``seed + epoch``). A run resumed from a checkpoint therefore replays exactly the steps an
uninterrupted run would have taken.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import EMBEDDED_DATASET, load_image_dataset, subset

if TYPE_CHECKING:
    from transformers import HfArgumentParser

CHECKPOINT_PREFIX = "checkpoint-"
_PARTIAL = ".partial"


def fail(message: str) -> NoReturn:
    """Stop a training script before any training with a one-line message and exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


@dataclass
class DataArguments:
    """The data: a Hub dataset, image folders, or the embedded offline default."""

    dataset_name: str | None = field(
        default=None, metadata={"help": f"Hub dataset id or saved folder; default {EMBEDDED_DATASET}"}
    )
    dataset_config_name: str | None = None
    train_dir: str | None = field(
        default=None, metadata={"help": "image folder for training (class subfolders)"}
    )
    validation_dir: str | None = field(default=None, metadata={"help": "image folder for validation"})
    train_split: str = "train"
    validation_split: str | None = field(default=None, metadata={"help": "default: validation, else test"})
    image_column_name: str | None = None
    label_column_name: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    hflip: bool = field(default=True, metadata={"help": "random horizontal flips"})


@dataclass
class CommonTrainingArguments:
    """Optimisation, logging, checkpoints and publishing: the flags every training script shares."""

    output_dir: str = field(metadata={"help": "where the model, checkpoints, logs and results go"})
    seed: int = 0
    num_train_epochs: int = 3
    max_train_steps: int | None = field(default=None, metadata={"help": "overrides num_train_epochs"})
    per_device_train_batch_size: int = 128
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    max_grad_norm: float | None = None
    mixed_precision: str | None = field(
        default=None,
        metadata={"help": "no | fp16 | bf16; default: what `accelerate launch` or its config says"},
    )
    report_to: str = field(default="none", metadata={"help": "tensorboard | wandb | none"})
    logging_steps: int = 20
    checkpointing_steps: int | None = None
    checkpoints_total_limit: int | None = 2
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "latest | PATH"})
    dataloader_num_workers: int = 0
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private_repo: bool = False
    hub_strategy: str = field(default="end", metadata={"help": "end | checkpoint"})
    hub_upload_attempts: int = field(
        default=4, metadata={"help": "tries per upload, with exponential backoff"}
    )

    def check(self) -> None:
        """Raise ``ValueError`` naming the flag and its allowed values for the first bad setting."""
        if self.hub_strategy not in ("end", "checkpoint"):
            raise ValueError(f"--hub_strategy must be 'end' or 'checkpoint'; got {self.hub_strategy!r}")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. org/vitmae-decay)")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"--mixed_precision must be no, fp16 or bf16; got {self.mixed_precision!r}")
        if self.report_to not in ("none", "tensorboard", "wandb"):
            raise ValueError(f"--report_to must be none, tensorboard or wandb; got {self.report_to!r}")
        for name in (
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "num_train_epochs",
            "logging_steps",
            "hub_upload_attempts",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1; got {getattr(self, name)}")
        for name in ("max_train_steps", "checkpointing_steps", "checkpoints_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1 when given; got {getattr(self, name)}")


def given_flags(parser: HfArgumentParser, argv: list[str] | None = None) -> set[str]:
    """The dataclass fields that ``argv`` (default ``sys.argv[1:]``) sets, however each flag is spelled
    (``--shortcut-decay``, an abbreviation such as ``--shortcut_d``, ``--no_x``, ``--x=value``): with a
    checkpoint to start from, only these change its config.

    ``parser`` reads ``argv`` a second time into a namespace holding a sentinel for every field; argparse
    fills in defaults only where the namespace has no value, so a field still holding the sentinel was not
    given. The parser itself is left unchanged.
    """
    names = {item.name for kind in parser.dataclass_types for item in dataclasses.fields(kind) if item.init}
    unset = object()
    namespace, _ = parser.parse_known_args(argv, namespace=argparse.Namespace(**dict.fromkeys(names, unset)))
    return {name for name in names if getattr(namespace, name) is not unset}


def stop_if_diverged(
    accelerator,
    step: int,
    learning_rate: float,
    lr_flag: str,
    loss: float | None = None,
    parameters: Iterable[torch.Tensor] | None = None,
) -> None:
    """Exit with status 1 and a one-line error (main process) when ``loss`` or any of ``parameters`` is NaN
    or inf: training on would waste the budget, and saving would publish broken weights.

    Every process must call it with the same ``loss``, the value gathered over processes, so all ranks take
    the same decision and stop together (none is left waiting at the next collective); the ``parameters``
    verdict is gathered too. Call it before saving a checkpoint or the model, which then stays as it was.
    """
    problem = None
    if loss is not None and not math.isfinite(loss):
        problem = f"training loss ({loss})"
    elif parameters is not None:
        finite = all(bool(torch.isfinite(parameter).all()) for parameter in parameters)
        flag = torch.tensor([0.0 if finite else 1.0], device=accelerator.device)
        if accelerator.gather(flag).max().item() > 0:
            problem = "weights"
    if problem is None:
        return
    if accelerator.is_main_process:
        tqdm.write(  # on a line of its own, not after a progress bar
            f"error: non-finite {problem} at step {step}, lr {learning_rate:.3g}: lower {lr_flag} or set "
            "--max_grad_norm (e.g. 1.0); the model was not saved",
            file=sys.stderr,
        )
    raise SystemExit(1)


def make_accelerator(args: CommonTrainingArguments):
    """The ``Accelerator`` of a training script: accumulation, precision, trackers, and a seedable sampler
    (``seed + epoch`` orders the data, so a resumed run replays the same batches)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(args.output_dir), logging_dir=str(Path(args.output_dir) / "logs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )


def run_settings(accelerator, learning_rate: float, global_batch: int) -> dict:
    """What the run really uses, whatever the flags, launcher and config said: printed at the start and
    written to ``results.json`` under ``"run"``."""
    return {
        "mixed_precision": accelerator.mixed_precision,
        "num_processes": accelerator.num_processes,
        "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
        "global_batch": global_batch,
        "learning_rate": learning_rate,
    }


def load_splits(data_args: DataArguments):
    """``(train, validation, image_column, label_column)`` from the data flags; validation and the label
    column may be None. Bad flags raise ``ValueError`` naming the flag."""
    if data_args.dataset_name and (data_args.train_dir or data_args.validation_dir):
        raise ValueError("give either --dataset_name or --train_dir/--validation_dir, not both")
    if data_args.train_dir:
        train = load_image_dataset(data_args.train_dir, split="train")
        validation = (
            load_image_dataset(data_args.validation_dir, split="train") if data_args.validation_dir else None
        )
    else:
        kwargs = {"name": data_args.dataset_config_name} if data_args.dataset_config_name else {}
        dataset = load_image_dataset(data_args.dataset_name, **kwargs)
        if data_args.train_split not in dataset:
            raise ValueError(
                f"--train_split {data_args.train_split!r} is not in the dataset: {sorted(dataset)}"
            )
        train = dataset[data_args.train_split]
        name = data_args.validation_split or next((s for s in ("validation", "test") if s in dataset), None)
        if name is not None and name not in dataset:
            raise ValueError(f"--validation_split {name!r} is not in the dataset: {sorted(dataset)}")
        validation = dataset[name] if name else None
    from .evaluation.features import find_image_column, find_label_column

    try:
        image_column = find_image_column(train, data_args.image_column_name)
    except ValueError as error:
        raise ValueError(str(error).replace("image_column=", "--image_column_name ")) from None
    label_column = data_args.label_column_name
    if label_column is not None and label_column not in train.features:
        raise ValueError(
            f"--label_column_name {label_column!r} is not a column of the dataset: {list(train.features)}"
        )
    label_column = label_column or find_label_column(train)
    train = subset(train, data_args.max_train_samples)
    validation = subset(validation, data_args.max_eval_samples) if validation is not None else None
    return train, validation, image_column, label_column


def step_seed(seed: int, *indices: int) -> int:
    """A 63-bit seed derived from ``seed`` and integer indices (rank, step, micro-batch...)."""
    return int(np.random.SeedSequence([seed, *indices]).generate_state(1, dtype=np.uint64)[0] >> 1)


@contextlib.contextmanager
def step_rng(seed: int, *indices: int) -> Iterator[torch.Generator]:
    """Run a block with torch's global RNG seeded from ``(seed, *indices)``, restoring it afterwards.

    Libraries that draw from the global RNG (kornia's augmentations, dropout) become deterministic per
    step; the yielded generator serves code that takes one explicitly.
    """
    value = step_seed(seed, *indices)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(value)
        yield torch.Generator().manual_seed(value)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only, none on biases, norms, tokens and other 1-D tensors."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        skip = parameter.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name
        (no_decay if skip else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


def save_checkpoint(accelerator, folder: str | os.PathLike, step: int, keep: int | None = None) -> Path:
    """``accelerator.save_state`` into a partial directory, then rename it: a kill leaves no half checkpoint.

    Every process must call this (each saves its own RNG state). Keeps the newest ``keep`` checkpoints.
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


def publish_directory(
    staging: str | os.PathLike, target: str | os.PathLike, marker: str = "config.json"
) -> Path:
    """Move every file of ``staging`` into ``target`` so that a crash never leaves a mixed model behind.

    The old ``marker`` (the file loaders look for first) is removed before, and the new one moved last:
    at any instant ``target`` holds either a complete model or no ``marker`` at all. Each move is atomic.
    """
    staging, target = Path(staging), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    (target / marker).unlink(missing_ok=True)
    files = sorted(path for path in staging.rglob("*") if path.is_file())
    for path in sorted(files, key=lambda path: path.name == marker):
        destination = target / path.relative_to(staging)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def with_retries(
    action: Callable[[], object], what: str, attempts: int = 4, base_delay: float = 2.0
) -> object:
    """Run ``action``, retrying with exponential backoff; then raise ``RuntimeError`` naming ``what``."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as error:  # network and Hub errors come in many types
            if attempt == attempts:
                raise RuntimeError(f"{what} failed after {attempts} attempts: {error}") from error
            delay = base_delay * 2 ** (attempt - 1)
            print(f"{what} failed ({error}); retrying in {delay:.0f} s ({attempt}/{attempts})", flush=True)
            time.sleep(delay)
    raise AssertionError("unreachable")


def resume_state(accelerator, folder: str | os.PathLike, resume_from: str | None) -> int:
    """Clear half-written checkpoints, load the one ``resume_from`` names (``latest`` or a path) into
    ``accelerator``, and return its step (0 when there is nothing to resume)."""
    if accelerator.is_main_process:
        remove_partial_checkpoints(folder)
    accelerator.wait_for_everyone()
    path = resolve_resume(folder, resume_from)
    if path is None:
        return 0
    accelerator.load_state(str(path))
    accelerator.print(f"resumed from {path} (step {checkpoint_step(path)})")
    return checkpoint_step(path)


class MetricsLog:
    """Send metrics to Accelerate's trackers (if any) and append them to a JSONL file (main process)."""

    def __init__(self, accelerator, path: str | os.PathLike, trackers: bool):
        self.accelerator, self.path, self.trackers = accelerator, Path(path), trackers

    def __call__(self, values: dict, step: int) -> None:
        if self.trackers:
            self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")


def push_folder(
    folder: str | os.PathLike,
    args: CommonTrainingArguments,
    what: str,
    script: str,
    path_in_repo: str | None = None,
) -> None:
    """Create ``args.hub_model_id`` if needed and upload ``folder`` (checkpoints, logs and hidden files stay
    local), each call retried with backoff ``args.hub_upload_attempts`` times."""
    from huggingface_hub import HfApi

    api = HfApi()
    with_retries(
        lambda: api.create_repo(args.hub_model_id, private=args.hub_private_repo, exist_ok=True),
        f"creating the Hub repo {args.hub_model_id}",
        attempts=args.hub_upload_attempts,
    )
    with_retries(
        lambda: api.upload_folder(
            repo_id=args.hub_model_id,
            folder_path=str(folder),
            path_in_repo=path_in_repo,
            commit_message=f"Upload {what} ({script})",
            ignore_patterns=["checkpoints/*", "logs/*", ".*"],
        ),
        f"uploading the {what} to {args.hub_model_id}",
        attempts=args.hub_upload_attempts,
    )


def push_final_model(output_dir: str | os.PathLike, args: CommonTrainingArguments, script: str) -> None:
    """Upload the finished ``output_dir``; when every retry fails, say so, point at the complete local
    copy, and exit with status 1."""
    try:
        push_folder(output_dir, args, "final model", script)
    except RuntimeError as error:
        print(
            f"error: {error}. The trained model is complete in {output_dir}; push it later with "
            f"`hf upload {args.hub_model_id} {output_dir}`.",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    print(f"pushed to {args.hub_model_id}", flush=True)
