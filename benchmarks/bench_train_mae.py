"""Training-step throughput of ``train_mae.py``'s loop against a transformers ``Trainer`` on the same work.

Same model (the script's default small decayed ViT on 28 px MNIST-sized images), same batches, same MAE
augmentation (applied in the Trainer's collator), same AdamW and schedule. Rounds alternate between the two
loops; a step is timed from the end of the previous step to its own end, so data loading and augmentation
count for both (setup and the first step of a round do not), and the median of per-round ratios is printed.

    python benchmarks/bench_train_mae.py            # about three minutes on 2 CPU threads
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

import torch
from accelerate import Accelerator
from transformers import Trainer, TrainerCallback, TrainingArguments, get_cosine_schedule_with_warmup

from hf_resdecay import ViTMAEDecayConfig, ViTMAEDecayForPreTraining
from hf_resdecay.training import parameter_groups, step_rng

SCRIPT = Path(__file__).resolve().parents[1] / "training_scripts" / "train_mae.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_mae", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


class _Images(torch.utils.data.Dataset):
    def __init__(self, count: int, size: int):
        self.images = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.images[index]}


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    script = _script()
    defaults = script.ModelArguments()
    fields = ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    fields += ("intermediate_size", "decoder_hidden_size", "decoder_num_hidden_layers")
    fields += ("decoder_num_attention_heads", "decoder_intermediate_size", "mask_ratio", "norm_pix_loss")
    config = ViTMAEDecayConfig(**{name: getattr(defaults, name) for name in fields})
    size = config.image_size
    augment = script.augmentation(size, 3, hflip=True)
    data = _Images(args.batch_size * args.steps, size)
    total = args.steps * args.rounds

    # The script's loop, as train_mae.py runs it.
    accelerator = Accelerator()
    torch.manual_seed(0)
    ours = ViTMAEDecayForPreTraining(config).train()
    optimizer = torch.optim.AdamW(parameter_groups(ours, 0.05), lr=1e-3, betas=(0.9, 0.95))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True)
    ours, optimizer, loader = accelerator.prepare(ours, optimizer, loader)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 0, total)

    def our_round(round_index: int) -> list[float]:
        stamps = []
        for index, batch in enumerate(loader):
            with accelerator.accumulate(ours), step_rng(0, 0, round_index * args.steps + index, 0):
                loss = ours(pixel_values=augment(batch["pixel_values"])).loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            stamps.append(time.perf_counter())
        return _intervals(stamps)

    # A Trainer on the same model, batches and augmentation.
    torch.manual_seed(0)
    theirs = ViTMAEDecayForPreTraining(config)
    timer = _StepTimer()

    def collate(rows):
        return {"pixel_values": augment(torch.stack([row["pixel_values"] for row in rows]))}

    with tempfile.TemporaryDirectory() as output:
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
            dataloader_num_workers=0,
            use_cpu=True,
        )
        trainer = Trainer(
            model=theirs, args=training_args, train_dataset=data, data_collator=collate, callbacks=[timer]
        )
        ratios, our_times, their_times = [], [], []
        for round_index in range(args.rounds + 1):  # round 0 warms both up
            mine = our_round(round_index)
            timer.stamps.clear()
            trainer.train()
            theirs_round = _intervals(timer.stamps)
            if round_index:
                ratios.append(statistics.median(theirs_round) / statistics.median(mine))
                our_times += mine
                their_times += theirs_round
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}, {args.rounds} rounds")
    print("| loop | samples/s (median step) |")
    print("|---|---:|")
    print(f"| train_mae.py | {args.batch_size / statistics.median(our_times):.1f} |")
    print(f"| transformers Trainer | {args.batch_size / statistics.median(their_times):.1f} |")
    print(f"ratio (script / Trainer throughput, median of rounds): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
