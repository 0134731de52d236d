"""The running side of a training script: the Accelerator, per-step randomness, optimiser groups,
a stop at the first non-finite loss, and metric logs."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .distributed import local_tensors

if TYPE_CHECKING:
    from .arguments import CommonTrainingArguments


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
        finite = all(bool(torch.isfinite(local).all()) for local in local_tensors(parameters))
        flag = torch.tensor([0.0 if finite else 1.0], device=accelerator.device)
        if accelerator.gather(flag).max().item() > 0:
            problem = "weights"
    if problem is None:
        return
    announce(
        accelerator,
        f"error: non-finite {problem} at step {step}, lr {learning_rate:.3g}: lower {lr_flag} or set "
        "--max_grad_norm (e.g. 1.0); the model was not saved",
        file=sys.stderr,
    )
    raise SystemExit(1)


def announce(accelerator, message: str, file: TextIO | None = None) -> None:
    """Print ``message`` (main process only) on a line of its own above any progress bar: the bars are
    cleared, the line written and flushed, then the bars redrawn, so a terminal, a pipe or a log file (where
    stdout is block-buffered, the bar unbuffered on stderr) shows the line after the bar, not glued on it."""
    if not accelerator.is_main_process:
        return
    stream = sys.stdout if file is None else file
    with tqdm.external_write_mode(file=stream):
        stream.write(f"{message}\n")
        stream.flush()


def make_accelerator(args: CommonTrainingArguments):
    """The ``Accelerator`` of a training script: accumulation, precision, trackers, ``--torch_compile``
    (Accelerate's dynamo plugin compiles the model in ``prepare``), and a seedable sampler (``seed + epoch``
    orders the data, so a resumed run replays the same batches).

    Precision and accumulation given to ``accelerate launch`` or its config win over the script's defaults:
    read them back from the accelerator, never from ``args``.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, TorchDynamoPlugin

    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(args.output_dir), logging_dir=str(Path(args.output_dir) / "logs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        dynamo_plugin=TorchDynamoPlugin(backend=args.torch_compile_backend) if args.torch_compile else None,
    )


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward pass, through the model family's own switch (transformers'
    ``activation_checkpointing_enable``, diffusers' ``enable_gradient_checkpointing``)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x
        model.activation_checkpointing_enable({"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "enable_gradient_checkpointing"):
        model.enable_gradient_checkpointing()
    else:
        raise ValueError(f"--gradient_checkpointing: {type(model).__name__} has no gradient checkpointing")


@dataclass
class SchedulePlan:
    """The lengths the lr schedule and the loop use: optimizer steps per epoch (None for a stream of unknown
    size), total and warmup steps, and the epochs they span (None when unknown)."""

    steps_per_epoch: int | None
    total_steps: int
    warmup_steps: int
    epochs: int | None


def plan_schedule(
    args: CommonTrainingArguments, train, loader, accumulation: int, global_batch: int, split: str = "train"
) -> SchedulePlan:
    """The :class:`SchedulePlan` of a run from its flags and data. A map-style ``train`` takes
    ``ceil(len(loader) / accumulation)`` steps an epoch (Accelerate steps on a last partial accumulation); a
    stream the size its dataset's metadata records, else none, and then it needs ``--max_train_steps`` and
    ``--warmup_steps``. Raises ``ValueError`` naming what to change."""
    if hasattr(train, "__len__"):
        steps_per_epoch = math.ceil(len(loader) / accumulation)
        if steps_per_epoch == 0:
            raise ValueError(
                f"the training set ({len(train)} images) is smaller than one global batch ({global_batch})"
            )
    else:
        splits = getattr(getattr(train, "info", None), "splits", None) or {}
        count = getattr(splits.get(split), "num_examples", None)
        steps_per_epoch = count // global_batch if count else None
    if args.max_train_steps is None and not steps_per_epoch:
        raise ValueError("the training data have no known length: give --max_train_steps")
    total = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    if args.warmup_steps is not None:
        warmup = args.warmup_steps
    elif steps_per_epoch:
        warmup = round(args.warmup_epochs * steps_per_epoch)
    else:
        raise ValueError("the training data have no known length: give --warmup_steps")
    epochs = math.ceil(total / steps_per_epoch) if steps_per_epoch else None
    return SchedulePlan(steps_per_epoch, total, warmup, epochs)


def run_settings(
    accelerator, learning_rate: float, global_batch: int, model: nn.Module | None = None
) -> dict:
    """What the run really uses, whatever the flags, launcher and config said: printed at the start and
    written to ``results.json`` under ``"run"``. With the prepared ``model``, also the compile backend (or
    False), whether activations are recomputed, and whether the weights are sharded."""
    settings = {
        "mixed_precision": accelerator.mixed_precision,
        "distributed_type": accelerator.distributed_type.value,
        "num_processes": accelerator.num_processes,
        "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
        "global_batch": global_batch,
        "learning_rate": learning_rate,
    }
    if model is not None:
        from accelerate.utils import is_compiled_module

        from .distributed import is_sharded

        plain = accelerator.unwrap_model(model, keep_torch_compile=False)
        backend = accelerator.state.dynamo_plugin.backend.value.lower()
        settings["torch_compile"] = backend if is_compiled_module(model) else False
        checkpointing = getattr(plain, "is_activation_checkpointing", None)  # transformers 5.x
        if checkpointing is None:  # diffusers models
            checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in plain.modules())
        settings["gradient_checkpointing"] = bool(checkpointing)
        settings["sharded"] = is_sharded(plain)
    return settings


def step_seed(seed: int, *indices: int) -> int:
    """A 63-bit seed derived from ``seed`` and integer indices (rank, step, micro-batch...)."""
    return int(np.random.SeedSequence([seed, *indices]).generate_state(1, dtype=np.uint64)[0] >> 1)


@contextlib.contextmanager
def step_rng(seed: int, *indices: int, device: torch.device | str = "cpu") -> Iterator[torch.Generator]:
    """Run a block with torch's global RNG seeded from ``(seed, *indices)``, restoring it afterwards.

    Code that draws from the global RNG (ViTMAE's random masking, dropout) becomes deterministic per
    step; the yielded generator, on ``device``, serves code that takes one explicitly (noise drawn where
    the model runs, never copied from the CPU).
    """
    value = step_seed(seed, *indices)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(value)
        yield torch.Generator(device=device).manual_seed(value)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only, none on biases, norms, tokens and other 1-D tensors."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        skip = parameter.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name
        (no_decay if skip else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


def resume_command(script: str, argv: list[str]) -> str:
    """The shell command that resumes a run of ``script`` started with ``argv``: the same flags, with
    ``--resume_from_checkpoint latest`` instead of any given one."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in ("--resume_from_checkpoint", "--resume-from-checkpoint"):
            skip = True
        elif not item.startswith(("--resume_from_checkpoint=", "--resume-from-checkpoint=")):
            kept.append(item)
    return shlex.join(["accelerate", "launch", script, *kept, "--resume_from_checkpoint", "latest"])


def exit_interrupted(script: str | None = None, argv: list[str] | None = None) -> NoReturn:
    """After Ctrl-C: one line (main process) with the command that resumes from the last checkpoint, and
    exit status 130, without a traceback. ``script`` and ``argv`` default to this process's command line."""
    if os.environ.get("RANK", "0") == "0":
        command = resume_command(script or sys.argv[0], sys.argv[1:] if argv is None else argv)
        message = f"error: interrupted; resume from the last checkpoint with: {command}"
        print(f"\n{message}", file=sys.stderr, flush=True)  # after any progress bar, on a line of its own
    raise SystemExit(130)
