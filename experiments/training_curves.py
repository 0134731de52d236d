#!/usr/bin/env python
"""What happens during training: kNN, effective rank and feature norms per layer at evenly spaced steps.

Trains each variant of ``reproduce_mae.py`` once (same flags, same ``accelerate launch`` path), keeping a
checkpoint every ``max-train-steps / points`` steps, then scores every checkpoint on fixed evaluation subsets:
DINO kNN (k=20, T=0.07) and effective rank (RankMe) for every layer, and the mean L2 norm of the token
features after every block (images unmasked, as for feature extraction). Two uses:

- choosing a budget and a model size *before* comparing variants: train the plain model alone at each
  candidate size and read whether its kNN still rises at the end of the budget;
- explaining a result: the same curves for plain and decayed side by side.

The learning-rate schedule runs to ``max-train-steps``, so intermediate points are checkpoints of one run,
not shorter runs (for those, run ``reproduce_mae.py`` with other ``--max-train-steps``).

    python experiments/training_curves.py --dataset embedded:cluttered-mnist --image-size 48 \\
        --train-args "--patch_size 6" --variants plain --max-train-steps 200 --output runs/curves
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce_mae


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=Path("runs/training_curves"))
    parser.add_argument("--dataset", default="embedded:cluttered-mnist")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--train-args", default="", help="extra train_mae.py flags for every variant")
    parser.add_argument(
        "--variants", nargs="+", default=["plain", "decay_0.3"], choices=list(reproduce_mae.VARIANTS)
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train-steps", type=int, default=200)
    parser.add_argument("--points", type=int, default=4, help="checkpoints scored per run (evenly spaced)")
    parser.add_argument("--eval-train-samples", type=int, default=5000)
    parser.add_argument("--eval-test-samples", type=int, default=2000)
    parser.add_argument("--norm-samples", type=int, default=256, help="test images for the feature norms")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    for name in ("max_train_steps", "points", "eval_train_samples", "eval_test_samples", "norm_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.points > args.max_train_steps:
        parser.error(f"--points must be <= --max-train-steps ({args.max_train_steps}); got {args.points}")
    # What reproduce_mae.train_command reads.
    args.smoke = False
    return args


def train(run_dir: Path, variant: str, args: argparse.Namespace) -> None:
    """One run through ``reproduce_mae``'s launch command, keeping every ``steps / points`` checkpoint."""
    command = reproduce_mae.train_command(run_dir, variant, args.seed, args)
    every = args.max_train_steps // args.points
    command[command.index("--checkpointing_steps") + 1] = str(every)
    command += ["--checkpoints_total_limit", str(args.points + 1)]
    log = run_dir.with_suffix(".log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:
        if subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode != 0:
            raise SystemExit(f"error: training {variant} failed; see {log}")


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, weights file)`` of every kept checkpoint, then the final model."""
    from hf_resdecay.training.checkpoints import checkpoint_dirs, checkpoint_step

    found = [
        (checkpoint_step(path), path / "model.safetensors")
        for path in checkpoint_dirs(run_dir / "checkpoints")
    ]
    final = json.loads((run_dir / "results.json").read_text())["steps"]
    if not found or found[-1][0] != final:
        found.append((final, run_dir / "model.safetensors"))
    return found


def block_norms(model, images, processor) -> list[float]:
    """Mean L2 norm of the token features after the embeddings and after every block (no masking)."""
    from hf_resdecay.evaluation.features import _forward_kwargs, _unmasked

    base = model.vit
    channels = "RGB" if model.config.num_channels == 3 else "L"
    pixels = processor(images=[image.convert(channels) for image in images], return_tensors="pt")[
        "pixel_values"
    ]
    with torch.inference_mode(), _unmasked(base) as masks:
        hidden = base(pixel_values=pixels, **_forward_kwargs(base, masks, pixels)).hidden_states
    return [state.norm(dim=-1).mean().item() for state in hidden]


def score_model(model, processor, train_set, test_set, args: argparse.Namespace) -> dict:
    """kNN and effective rank for every layer and the feature norm after every block of one model."""
    from hf_resdecay.evaluation import effective_rank, extract_features, knn_accuracy

    model.eval()
    options = dict(layers="all", image_processor=processor, cache=False, progress=False)
    train = extract_features(model.vit, train_set, **options)
    test = extract_features(model.vit, test_set, **options)
    knn = [
        knn_accuracy(train.features[layer], train.labels, test.features[layer], test.labels)["top1"]
        for layer in test.layers
    ]
    rank = [effective_rank(test.features[layer]) for layer in test.layers]
    norms = block_norms(model, test_set["image"][: args.norm_samples], processor)
    return {"knn_top1": knn, "effective_rank": rank, "norms": norms}


def score_run(run_dir: Path, train_set, test_set, args: argparse.Namespace) -> list[dict]:
    """:func:`score_model` at initialisation (step 0, seeded as the script seeds it) and every kept step."""
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor

    from hf_resdecay import ViTMAEDecayForPreTraining

    processor = AutoImageProcessor.from_pretrained(run_dir)
    config = ViTMAEDecayForPreTraining.config_class.from_pretrained(run_dir)
    torch.manual_seed(args.seed)
    points = [
        {"step": 0, **score_model(ViTMAEDecayForPreTraining(config), processor, train_set, test_set, args)}
    ]
    for step, weights in checkpoints(run_dir):
        model = ViTMAEDecayForPreTraining.from_pretrained(run_dir)
        model.load_state_dict(load_file(weights))
        points.append({"step": step, **score_model(model, processor, train_set, test_set, args)})
    return points


def markdown(curves: dict[str, list[dict]]) -> str:
    lines = [
        "| variant | step | kNN, last layer (%) | best layer kNN (%) | rank, last layer | norm per block |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for variant, points in curves.items():
        for point in points:
            best = int(np.argmax(point["knn_top1"]))
            norms = " ".join(f"{value:.2f}" for value in point["norms"])
            lines.append(
                f"| {variant} | {point['step']} | {point['knn_top1'][-1]:.2f} "
                f"| {point['knn_top1'][best]:.2f} (layer {best}) "
                f"| {point['effective_rank'][-1]:.2f} | {norms} |"
            )
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, list[dict]], path: Path) -> Path:
    """Top row against the training step, bottom row against depth at the last step; a colour per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hf_resdecay.atomic import save_figure_atomic

    figure, axes = plt.subplots(2, 3, figsize=(15, 8))
    for variant, points in curves.items():
        steps = [point["step"] for point in points]
        knn = axes[0, 0].plot(
            steps, [p["knn_top1"][-1] for p in points], marker="o", label=f"{variant}, last layer"
        )
        color = knn[0].get_color()
        axes[0, 0].plot(
            steps, [max(p["knn_top1"]) for p in points], ls="--", color=color, label=f"{variant}, best layer"
        )
        axes[0, 1].plot(steps, [p["effective_rank"][-1] for p in points], marker="o", color=color)
        axes[0, 2].plot(steps, [p["norms"][-1] for p in points], marker="o", color=color, label=variant)
        last = points[-1]
        for axis, values in zip(
            axes[1], (last["knn_top1"], last["effective_rank"], last["norms"]), strict=True
        ):
            axis.plot(range(len(values)), values, marker="o", color=color)
    labels = (
        "kNN top-1 (%)",
        "effective rank (RankMe), last layer",
        "mean token norm after the last block",
        "kNN top-1 at the last step (%)",
        "effective rank at the last step",
        "mean token norm at the last step",
    )
    for index, (axis, label) in enumerate(zip(axes.flat, labels, strict=True)):
        axis.set(xlabel="training step" if index < 3 else "layer (0 = embeddings)", ylabel=label)
        axis.grid(alpha=0.3)
    axes[0, 0].legend(frameon=False, fontsize="small")
    axes[0, 2].legend(frameon=False)
    figure.tight_layout()
    return save_figure_atomic(figure, path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from hf_resdecay.atomic import atomic_write, write_json_atomic
    from hf_resdecay.data import load_image_dataset, subset

    train_set = subset(load_image_dataset(args.dataset, split="train"), args.eval_train_samples, seed=1234)
    test_set = subset(load_image_dataset(args.dataset, split="test"), args.eval_test_samples, seed=1234)
    curves = {}
    for variant in args.variants:
        run_dir = args.output / variant / f"seed-{args.seed}"
        done = run_dir / "curve.json"
        if not done.exists():
            if not (run_dir / "results.json").exists():
                train(run_dir, variant, args)
            write_json_atomic(score_run(run_dir, train_set, test_set, args), done)
        curves[variant] = json.loads(done.read_text())
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    write_json_atomic({"settings": settings, "curves": curves}, args.output / "curves.json")
    table = markdown(curves)
    with atomic_write(args.output / "curves.md") as handle:
        handle.write(table)
    plot(curves, args.output / "curves.png")
    print(table)
    return curves


if __name__ == "__main__":
    main()
