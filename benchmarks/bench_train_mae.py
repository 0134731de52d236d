"""Training-step throughput of ``train_mae.py``'s loop against a transformers ``Trainer`` on the same work.

Same model (the script's default small decayed ViT on 28 px images), same data pipeline (the script's
``TrainImages``: images decoded, random-resized-cropped and flipped in DataLoader workers, uint8 batches,
normalised on the device), same AdamW and schedule. The script's arm is its own loop
(``hf_resdecay.training.TrainingLoop``). Rounds alternate between the loops; a step is timed from the end of
the previous step to its own end, so data loading counts for both (setup and the first step of a round do
not), and the median of per-round ratios is printed. ``--torch_compile`` adds a third arm, the script's loop
on the compiled model (as ``train_mae.py --torch_compile``), and its ratio to the eager loop.

    python benchmarks/bench_train_mae.py                    # about three minutes on 2 CPU threads
    python benchmarks/bench_train_mae.py --torch_compile    # plus compilation (minutes with inductor)
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from accelerate import Accelerator
from datasets import Dataset, Features, Image
from transformers import Trainer, TrainerCallback, TrainingArguments, get_cosine_schedule_with_warmup

from hf_resdecay import ViTMAEDecayForPreTraining
from hf_resdecay.training import MetricsLog, TrainingLoop, parameter_groups
from hf_resdecay.training.images import ImageTransform, Normalize, TrainImages, normalization_stats

SCRIPT = Path(__file__).resolve().parents[1] / "training_scripts" / "train_mae.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_mae", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _images(count: int, size: int) -> Dataset:
    """Random RGB images a little larger than the model's input, so every crop resizes."""
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (size + 4, size + 4, 3), dtype=np.uint8) for _ in range(count)]
    return Dataset.from_dict({"image": pictures}, features=Features({"image": Image()}))


def _intervals(stamps: list[float]) -> list[float]:
    """Times between consecutive step ends: a whole step, data loading and augmentation included."""
    return [later - earlier for earlier, later in itertools.pairwise(stamps)]


class _StepTimer(TrainerCallback):
    def __init__(self):
        self.stamps: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=11, help="optimisation steps per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers for both loops")
    parser.add_argument("--torch_compile", action="store_true", help="add the compiled script loop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    script = _script()  # the model a bare `train_mae.py` builds (its default recipe)
    config = script.build_model(script.parse_arguments(["--output_dir", "unused"])[0]).config
    size = config.image_size
    data = TrainImages(_images(args.batch_size * args.steps, size), "image", ImageTransform(size, 3))
    normalize = Normalize(*normalization_stats(3))
    total = args.steps * args.rounds

    accelerator = Accelerator()
    arms = {"train_mae.py": False, **({"train_mae.py --torch_compile": True} if args.torch_compile else {})}
    loops = {}
    with tempfile.TemporaryDirectory() as output:
        for name, compiled in arms.items():
            torch.manual_seed(0)
            model = ViTMAEDecayForPreTraining(config).train()
            optimizer = torch.optim.AdamW(parameter_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
            loader = torch.utils.data.DataLoader(
                data, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers
            )
            model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
            step_model = torch.compile(model) if compiled else model
            scheduler = get_cosine_schedule_with_warmup(optimizer, 0, total)
            options = SimpleNamespace(
                seed=0, logging_steps=10**9, checkpointing_steps=None, max_grad_norm=None, push_to_hub=False
            )

            def train_step(batch, generator, log_now, step_model=step_model):
                return step_model(pixel_values=normalize(batch["pixel_values"])).loss, {}

            stamps: list[float] = []
            loops[name] = (
                TrainingLoop(
                    accelerator, model, optimizer, scheduler, loader, data, options, args.steps,
                    Path(output), MetricsLog(accelerator, Path(output) / "log.jsonl", False), "--lr", 1e-3,
                    "bench", train_step, after_step=lambda stamps=stamps: stamps.append(time.perf_counter()),
                ),
                stamps,
            )  # fmt: skip

        def script_round(name: str) -> list[float]:
            loop, stamps = loops[name]
            stamps.clear()
            loop.run()
            return _intervals(stamps)

        # A Trainer on the same model, data and normalisation.
        torch.manual_seed(0)
        theirs = ViTMAEDecayForPreTraining(config)
        timer = _StepTimer()

        def collate(rows):
            return {"pixel_values": normalize(torch.stack([row["pixel_values"] for row in rows]))}

        training_args = TrainingArguments(
            output_dir=output,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps,
            learning_rate=1e-3,
            weight_decay=0.05,
            adam_beta2=0.95,
            lr_scheduler_type="cosine",
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=args.workers,
            use_cpu=True,
        )
        trainer = Trainer(
            model=theirs, args=training_args, train_dataset=data, data_collator=collate, callbacks=[timer]
        )
        times: dict[str, list[float]] = {name: [] for name in [*arms, "transformers Trainer"]}
        ratios: dict[str, list[float]] = {name: [] for name in times}
        for round_index in range(args.rounds + 1):  # round 0 warms every arm up (and compiles)
            medians = {name: script_round(name) for name in arms}
            timer.stamps.clear()
            trainer.train()
            medians["transformers Trainer"] = _intervals(timer.stamps)
            if round_index:
                eager = statistics.median(medians["train_mae.py"])
                for name, intervals in medians.items():
                    times[name] += intervals
                    ratios[name].append(eager / statistics.median(intervals))
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}, {args.rounds} rounds")
    print("| loop | samples/s (median step) | throughput vs train_mae.py (median of rounds) |")
    print("|---|---:|---:|")
    for name, intervals in times.items():
        speed = args.batch_size / statistics.median(intervals)
        print(f"| {name} | {speed:.1f} | {statistics.median(ratios[name]):.3f} |")


if __name__ == "__main__":
    main()
