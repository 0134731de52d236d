"""Command-line arguments every training script shares, and loading the data they name."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, NoReturn

from transformers import HfArgumentParser, PretrainedConfig
from transformers.hf_argparser import string_to_bool

from ..data import EMBEDDED_DATASET, find_image_column, find_label_column, load_image_dataset, subset
from ..hub import DEFAULT_LICENSE, check_license
from ..shortcut import SHORTCUT_SCHEDULES

ShortcutSchedule = Literal[SHORTCUT_SCHEDULES]
"""The ``--shortcut_schedule`` choices, from :data:`hf_resdecay.shortcut.SHORTCUT_SCHEDULES`."""


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


DEFAULT_CHECKPOINTING_STEPS = 500
"""Checkpoints are on by default (as in diffusers' examples): a killed run loses at most this many steps."""


@dataclass
class CommonTrainingArguments:
    """Optimisation, logging, checkpoints and publishing: the flags every training script shares."""

    output_dir: str = field(metadata={"help": "where the model, checkpoints, logs and results go"})
    recipe: str | None = field(
        default=None,
        metadata={
            "help": "YAML file of flag values (training_scripts/recipes/); flags on the command line win"
        },
    )
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
    mixed_precision: Literal["no", "fp16", "bf16"] | None = field(
        default=None, metadata={"help": "default: what `accelerate launch` or its config says"}
    )
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    logging_steps: int = 20
    checkpointing_steps: int = field(
        default=DEFAULT_CHECKPOINTING_STEPS,
        metadata={"help": "save a resumable checkpoint every N optimizer steps (0: never)"},
    )
    checkpoints_total_limit: int | None = field(
        default=2, metadata={"help": "keep the newest N checkpoints (none: keep all)"}
    )
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
    hub_strategy: Literal["end", "checkpoint"] = field(
        default="end", metadata={"help": "push at the end only, or every checkpoint too"}
    )
    hub_upload_attempts: int = field(
        default=4, metadata={"help": "tries per upload, with exponential backoff"}
    )
    license: str = field(
        default=DEFAULT_LICENSE,
        metadata={
            "help": "the weights' licence in the model card: a Hub licence id (mit, cc-by-4.0, other...)"
        },
    )

    def check(self) -> None:
        """Raise ``ValueError`` naming the flag and its allowed values for the first bad setting."""
        for item in dataclasses.fields(self):  # the scripts' own float flags too (learning rates)
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{item.name} must be a finite number; got {value}")
        check_choices(self)
        self._check_output_dir()
        check_license(self.license)
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (e.g. org/vitmae-decay)")
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
        for name in ("dataloader_num_workers", "checkpointing_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0; got {getattr(self, name)}")
        for name in ("max_train_steps", "checkpoints_total_limit"):
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


def check_choices(arguments: Any) -> None:
    """Raise ``ValueError`` naming the flag for a field outside its ``Literal[...]`` choices.

    argparse checks the command line against the same types; this covers dataclasses built in code.
    """
    hints = typing.get_type_hints(type(arguments))
    for item in dataclasses.fields(arguments):
        kind = hints[item.name]  # Literal[...] or Literal[...] | None
        literal = next(
            (part for part in (kind, *typing.get_args(kind)) if typing.get_origin(part) is Literal), None
        )
        options = typing.get_args(literal) if literal is not None else ()
        value = getattr(arguments, item.name)
        if options and value is not None and value not in options:
            allowed = ", ".join(str(option) for option in options)
            raise ValueError(f"--{item.name} must be one of {allowed}; got {value!r}")


def given_fields(arguments: Any, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """The fields of a model-arguments dataclass that were set (not None), less ``exclude``.

    Model flags default to None, "keep the config": the config class's default for a fresh model, the
    checkpoint's value when starting from one. Only the fields set here change it, however they were spelled.
    """
    return {
        item.name: getattr(arguments, item.name)
        for item in dataclasses.fields(arguments)
        if item.name not in exclude and getattr(arguments, item.name) is not None
    }


def parse_config_overrides(config: PretrainedConfig | Mapping[str, Any], text: str | None) -> dict[str, Any]:
    """``--config_overrides "key=value,..."`` as ``{key: value}``, each value read with the type of the field
    it replaces in ``config`` (a transformers config, or a diffusers config dict), by transformers'
    ``PretrainedConfig.update_from_string``. ``config`` itself is left unchanged.

    Raises ``ValueError`` naming the flag for a malformed item, an unknown key or a value of the wrong type.
    """
    items = [item.strip() for item in (text or "").split(",") if item.strip()]
    for item in items:
        key, _, _ = item.partition("=")
        if item.count("=") != 1 or not key.strip():
            raise ValueError(f"--config_overrides: expected key=value, got {item!r}")
    if not items:
        return {}
    values = config.to_dict() if isinstance(config, PretrainedConfig) else dict(config)
    scratch = SimpleNamespace(**values)
    try:
        PretrainedConfig.update_from_string(scratch, ",".join(items))
    except (ValueError, TypeError) as error:
        raise ValueError(f"--config_overrides: {error}") from None
    return {key: getattr(scratch, key) for key in (item.partition("=")[0] for item in items)}


class ScriptArgumentParser(HfArgumentParser):
    """The training scripts' parser: ``HfArgumentParser`` plus recipes, exact flag names and tri-state
    booleans.

    - ``--recipe FILE``: a YAML file of ``flag: value`` lines read before the command line, so any flag given
      there wins; a key that is no flag of the script is refused, naming it.
    - Flags must be written in full (``allow_abbrev=False``): an abbreviation such as ``--shortcut_d`` is
      refused rather than guessed, and a flag added later cannot make an old abbreviation change meaning.
    - A ``bool | None`` field (a model flag that keeps the config when not given) takes ``--x``,
      ``--x false`` and ``--no_x``, like a plain ``bool`` field.
    """

    def __init__(self, dataclass_types):
        super().__init__(dataclass_types, allow_abbrev=False)

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        if field.type != bool | None or field.default is not None:
            HfArgumentParser._parse_dataclass_field(parser, field)
            return
        names = dict.fromkeys((f"--{field.name}", f"--{field.name.replace('_', '-')}"))
        parser.add_argument(
            *names, type=string_to_bool, nargs="?", const=True, default=None, **dict(field.metadata)
        )
        negated = dict.fromkeys((f"--no_{field.name}", f"--no-{field.name.replace('_', '-')}"))
        parser.add_argument(*negated, action="store_false", dest=field.name, help=f"--{field.name} false")

    def flag_names(self) -> set[str]:
        """The fields a recipe may set: every flag of the script but ``recipe`` itself."""
        names = {item.name for kind in self.dataclass_types for item in dataclasses.fields(kind) if item.init}
        return names - {"recipe"}

    def recipe_flags(self, path: str | os.PathLike) -> list[str]:
        """The command-line tokens a recipe file stands for (``--key value`` per line; null lines skipped).

        Raises ``ValueError`` naming the file and the key for a missing file, bad YAML, a key that is no flag
        of this script, or a value that is not one number, string or boolean.
        """
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"--recipe {path}: no such file")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"--recipe {path}: not valid YAML ({' '.join(str(error).split())})") from None
        if not isinstance(values, dict):
            raise ValueError(f"--recipe {path}: expected 'flag: value' lines, got {type(values).__name__}")
        known = self.flag_names()
        tokens = []
        for key, value in values.items():
            if key not in known:
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ValueError(
                    f"--recipe {path}: unknown key {key!r}{hint}; every key must be a flag of this script"
                )
            if value is None:
                continue
            if isinstance(value, bool):
                value = str(value).lower()
            elif not isinstance(value, int | float | str):
                raise ValueError(
                    f"--recipe {path}: {key} must be one number, string or true/false; got {value!r}"
                )
            tokens += [f"--{key}", str(value)]
        return tokens

    def parse(
        self, argv: Sequence[str] | None = None, default_recipe: str | os.PathLike | None = None
    ) -> tuple:
        """The dataclass instances from ``argv`` (default: the command line, as argparse reads it) on top of
        the recipe ``--recipe`` names.

        ``default_recipe`` stands in when neither ``--recipe`` nor ``--model_name_or_path`` is given: a model
        built from scratch gets the script's default sizes, a checkpoint keeps its own config. Raises
        ``ValueError`` for a bad recipe or an unknown (e.g. abbreviated) flag; a bad value exits through
        argparse (status 2).
        """
        argv = sys.argv[1:] if argv is None else list(argv)
        finder = argparse.ArgumentParser(prog=self.prog, add_help=False, allow_abbrev=False)
        finder.add_argument("--recipe")
        recipe = finder.parse_known_args(argv)[0].recipe
        if recipe is None and default_recipe is not None:
            parsed = self._parse_all(argv)
            values = {key: value for instance in parsed for key, value in vars(instance).items()}
            if values.get("model_name_or_path") is not None:
                return parsed
            recipe = default_recipe
        tokens = [] if recipe is None else ["--recipe", str(recipe), *self.recipe_flags(recipe)]
        return self._parse_all([*tokens, *argv])

    def _parse_all(self, argv: list[str]) -> tuple:
        *parsed, unknown = self.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True, look_for_args_file=False
        )
        if unknown:
            raise ValueError(
                f"unrecognized arguments: {' '.join(unknown)} (flags are written in full: see --help)"
            )
        return tuple(parsed)


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
