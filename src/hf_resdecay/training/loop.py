"""The one training loop both scripts drive: micro-batches, gradient accumulation, the lr schedule once per
optimizer step, logging, divergence stops, checkpoints that record where the loop stands, epoch hooks.

A script supplies what is its own: a ``train_step`` computing the loss of one micro-batch, and optional hooks
(after each optimizer step, at the end of each epoch, the weights a checkpoint holds). The data come either
from a map-style loader prepared by Accelerate (a known number of batches per epoch, order from the
seedable sampler) or from a stream (:class:`~hf_resdecay.training.images.StreamingTrainImages`, an unknown
number); either way an epoch is one pass over the loader, and a checkpoint saves ``(epoch, batches read in
it)``, so a resumed run skips exactly the batches already trained on.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoints import save_checkpoint
from .images import BAD_IMAGES
from .publish import push_folder
from .runtime import MetricsLog, step_rng, stop_if_diverged


@dataclass
class LoopResult:
    """Where a finished loop stands: optimizer steps taken, epochs begun, the last loss (mean over
    processes), and the images skipped because they did not decode (all processes, whole run)."""

    step: int
    epochs: int
    last_loss: float
    bad_images: list[str] = field(default_factory=list)


@dataclass
class TrainingLoop:
    """Run ``train_step`` over ``loader`` until ``total_steps`` optimizer steps (see the module docstring).

    ``train_step(batch, generator, log_now)`` returns the micro-batch's loss and a dict of extra metrics to
    log (looked at only when ``log_now``); ``generator`` is seeded from ``(seed, rank, step, micro-batch)``
    on the accelerator's device. ``data`` is the dataset whose ``set_epoch`` fixes each epoch's random crops.
    ``learning_rate`` (the peak) and ``lr_flag`` name what to lower when the loss diverges. ``states``: the
    objects besides model and optimizer whose state a checkpoint holds (lr schedule, EMA), by name.
    """

    accelerator: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_schedule: object
    loader: Iterable
    data: object
    args: object
    total_steps: int
    checkpoints: Path
    log: MetricsLog
    lr_flag: str
    learning_rate: float
    script: str
    train_step: Callable[[dict, torch.Generator, bool], tuple[torch.Tensor, dict]]
    streaming: bool = False
    after_step: Callable[[], None] | None = None
    end_of_epoch: Callable[[int, int], None] | None = None
    saved_weights: Callable[[], Iterable[torch.Tensor]] | None = None
    states: dict[str, object] = field(default_factory=dict)

    def _batches(self, epoch: int, skip: int) -> Iterator[dict]:
        """The micro-batches of ``epoch`` after the first ``skip``, on the accelerator's device."""
        self.data.set_epoch(epoch)
        if not self.streaming:
            self.loader.set_epoch(epoch)
            yield from self.accelerator.skip_first_batches(self.loader, skip)
            return
        device = self.accelerator.device
        for batch in itertools.islice(iter(self.loader), skip, None):
            yield {
                key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
                for key, value in batch.items()
            }

    def _note_bad_images(self, batch: dict) -> None:
        """Record the images of ``batch`` that did not decode; without ``--skip_bad_images`` stop with one
        line naming the first (exit status 1)."""
        bad = batch.pop(BAD_IMAGES, None)
        if not bad:
            return
        if not getattr(self.data, "skip_bad_images", False):
            tqdm.write(
                f"error: cannot decode the image {bad[0]}: fix or remove the file, or pass --skip_bad_images "
                "to train on without it",
                file=sys.stderr,
            )
            raise SystemExit(1)
        for name in bad:
            if name not in self.bad_images:
                self.bad_images.append(name)

    def _all_bad_images(self) -> list[str]:
        """The bad images every process met (every process must call it)."""
        from accelerate.utils import gather_object

        found = gather_object([self.bad_images]) if self.accelerator.num_processes > 1 else [self.bad_images]
        return sorted({name for names in found for name in names})

    def _weights(self) -> Iterable[torch.Tensor]:
        return self.saved_weights() if self.saved_weights is not None else self.model.parameters()

    def _check(self, step: int, loss: float | None = None, weights: bool = False) -> None:
        parameters = self._weights() if weights else None
        stop_if_diverged(
            self.accelerator, step, self.learning_rate, self.lr_flag, loss=loss, parameters=parameters
        )

    def run(self, start_step: int = 0, position: dict | None = None, steps_per_epoch: int | None = None):
        """Train from ``start_step`` (resumed at ``position``, the dict a checkpoint saved; without one, the
        position follows from ``steps_per_epoch``) to ``total_steps``; returns a :class:`LoopResult`."""
        accelerator, args = self.accelerator, self.args
        accumulation = accelerator.gradient_accumulation_steps
        self.bad_images = list((position or {}).get(BAD_IMAGES, []))
        if position:
            epoch, skip = position["epoch"], position["batches"]
        elif steps_per_epoch:
            epoch = start_step // steps_per_epoch
            skip = (start_step - epoch * steps_per_epoch) * accumulation
        else:
            epoch, skip = 0, 0
        step, last_loss = start_step, float("nan")
        progress = tqdm(
            total=self.total_steps,
            initial=start_step,
            disable=not accelerator.is_local_main_process,
            desc="train",
        )
        self.model.train()
        while step < self.total_steps:
            read = skip
            for batch in self._batches(epoch, skip):
                read += 1
                self._note_bad_images(batch)
                with accelerator.accumulate(self.model), self._rng(step, read) as generator:
                    log_now = accelerator.sync_gradients and (step + 1) % args.logging_steps == 0
                    loss, extra = self._micro_step(batch, generator, log_now)
                if not accelerator.sync_gradients:
                    continue
                step += 1
                if self.after_step is not None:
                    self.after_step()
                last_loss = accelerator.gather(loss.detach().float().reshape(1)).mean().item()
                self._check(step, loss=last_loss)
                progress.update(1)
                progress.set_postfix(loss=f"{last_loss:.4f}", epoch=epoch + 1)
                if log_now:
                    self.log({"loss": last_loss, "lr": self.lr_schedule.get_last_lr()[0], **extra}, step)
                if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                    self._checkpoint(step, {"epoch": epoch, "batches": read})
                if step >= self.total_steps:
                    break
            else:  # the epoch's data ran out before the budget
                if read == skip == 0:
                    raise ValueError("the training data yielded no batch: fewer images than one batch?")
                if self.end_of_epoch is not None and step < self.total_steps:
                    self._check(step, weights=True)
                    self.end_of_epoch(epoch + 1, step)
                    accelerator.wait_for_everyone()
                    self.model.train()
                epoch, skip = epoch + 1, 0
        progress.close()
        self._check(step, weights=True)
        return LoopResult(step=step, epochs=epoch + 1, last_loss=last_loss, bad_images=self._all_bad_images())

    def _rng(self, step: int, read: int):
        micro = (read - 1) % self.accelerator.gradient_accumulation_steps
        return step_rng(
            self.args.seed, self.accelerator.process_index, step, micro, device=self.accelerator.device
        )

    def _micro_step(self, batch: dict, generator: torch.Generator, log_now: bool):
        accelerator = self.accelerator
        loss, extra = self.train_step(batch, generator, log_now)
        accelerator.backward(loss)
        if accelerator.sync_gradients and self.args.max_grad_norm:
            accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        self.optimizer.step()
        if accelerator.sync_gradients:  # once per optimizer step, not per micro-batch
            self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, extra

    def _checkpoint(self, step: int, position: dict) -> None:
        self._check(step, weights=True)
        bad = self._all_bad_images()
        if bad:
            position = {**position, BAD_IMAGES: bad}
        args = self.args
        saved = save_checkpoint(
            self.accelerator,
            self.checkpoints,
            step,
            args.checkpoints_total_limit,
            position=position,
            states=self.states,
        )
        if args.push_to_hub and args.hub_strategy == "checkpoint" and self.accelerator.is_main_process:
            push_folder(saved, args, f"checkpoint at step {step}", self.script, "last-checkpoint")
