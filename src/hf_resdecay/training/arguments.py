"""Command-line arguments every training script shares, and loading the data they name."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from ..data import EMBEDDED_DATASET, find_image_column, find_label_column, load_image_dataset, subset

if TYPE_CHECKING:
    from transformers import HfArgumentParser


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
    streaming: bool = field(
        default=False,
        metadata={"help": "stream a Hub dataset instead of downloading it (needs --max_train_steps)"},
    )
    shuffle_buffer_size: int = field(
        default=10_000, metadata={"help": "images in the streaming shuffle buffer"}
    )
    skip_bad_images: bool = field(
        default=False,
        metadata={"help": "train on when an image does not decode (replaced; listed in results.json)"},
    )

    def check(self) -> None:
        """Raise ``ValueError`` naming the flag for a data folder that does not exist (before any setup)."""
        for flag in ("train_dir", "validation_dir"):
            value = getattr(self, flag)
            if value is not None and not Path(value).expanduser().is_dir():
                raise ValueError(f"--{flag} {value}: no such folder")
        name = self.dataset_name
        if name is not None and _looks_like_path(name) and not Path(name).expanduser().exists():
            raise ValueError(
                f"--dataset_name {name}: no such folder (a Hub dataset id has the form org/name)"
            )


def _looks_like_path(name: str) -> bool:
    """Whether a ``--dataset_name`` can only be a local path (a Hub id is ``name`` or ``org/name``)."""
    if name.startswith("embedded:"):
        return False
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith("/")


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
    warmup_steps: int | None = field(
        default=None, metadata={"help": "overrides warmup_epochs (needed with --streaming of unknown size)"}
    )
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
    dataloader_num_workers: int | None = field(
        default=None, metadata={"help": "image-decoding workers per process; default: from the free cores"}
    )
    torch_compile: bool = field(default=False, metadata={"help": "compile the model with torch.compile"})
    torch_compile_backend: str = field(
        default="inductor",
        metadata={"help": "inductor | aot_eager | cudagraphs | ... (torch._dynamo backends)"},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute activations in the backward pass: less memory, ~30% slower"},
    )
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private_repo: bool = False
    hub_strategy: str = field(default="end", metadata={"help": "end | checkpoint"})
    hub_upload_attempts: int = field(
        default=4, metadata={"help": "tries per upload, with exponential backoff"}
    )

    def check(self) -> None:
        """Raise ``ValueError`` naming the flag and its allowed values for the first bad setting."""
        for item in dataclasses.fields(self):  # the scripts' own float flags too (learning rates)
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{item.name} must be a finite number; got {value}")
        self._check_output_dir()
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
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"--warmup_steps must be >= 0 when given; got {self.warmup_steps}")
        if self.dataloader_num_workers is not None and self.dataloader_num_workers < 0:
            raise ValueError(f"--dataloader_num_workers must be >= 0; got {self.dataloader_num_workers}")
        for name in ("max_train_steps", "checkpointing_steps", "checkpoints_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1 when given; got {getattr(self, name)}")

    def _check_output_dir(self) -> None:
        path = Path(self.output_dir).expanduser()
        if path.exists() and not path.is_dir():
            raise ValueError(f"--output_dir {self.output_dir} is a file, not a folder: choose another path")
        existing = next(folder for folder in (path.absolute(), *path.absolute().parents) if folder.exists())
        if not existing.is_dir():
            raise ValueError(f"--output_dir {self.output_dir}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"--output_dir {self.output_dir}: {existing} is not writable by this user")


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
        if data_args.streaming and _is_hub_id(data_args.dataset_name):
            kwargs["streaming"] = True
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
    if data_args.streaming:
        return (*_streamed(train, validation, data_args), image_column, label_column)
    train = subset(train, data_args.max_train_samples)
    validation = subset(validation, data_args.max_eval_samples) if validation is not None else None
    return train, validation, image_column, label_column


STREAMED_EVAL_SAMPLES = 10_000
"""Validation images read from a stream (for the kNN monitor) when ``--max_eval_samples`` is not given."""


def _is_hub_id(name: str | None) -> bool:
    return name is not None and not name.startswith("embedded:") and not Path(name).is_dir()


def _streamed(train, validation, data_args: DataArguments):
    """``--streaming``: training images as an ``IterableDataset`` (local data become one, in shards, so the
    streaming path is the same everywhere) and the validation images read once into a ``Dataset``."""
    from datasets import Dataset, IterableDataset

    if not isinstance(train, IterableDataset):
        train = train.to_iterable_dataset(num_shards=max(1, min(len(train), 64)))
    if data_args.max_train_samples is not None:
        train = train.take(data_args.max_train_samples)
    if isinstance(validation, IterableDataset):
        rows = list(validation.take(data_args.max_eval_samples or STREAMED_EVAL_SAMPLES))
        validation = Dataset.from_list(rows, features=validation.features)
    elif validation is not None:
        validation = subset(validation, data_args.max_eval_samples)
    return train, validation
