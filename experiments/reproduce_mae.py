#!/usr/bin/env python
"""Decayed vs plain MAE at CPU scale: train every variant with the real script, score it, publish a table.

Each (variant, seed) is trained through ``accelerate launch training_scripts/train_mae.py`` on the embedded
MNIST with the same budget, then scored with the package's evaluation API on fixed train/test subsets: DINO
weighted kNN (k=20, T=0.07) and effective rank for every layer, the linear probe ("paper" protocol) on the
last layer, and the masked-reconstruction loss on the test subset with fixed masks. Variants:

- ``plain``: upstream ViTMAE (``shortcut_decay=0``, final LayerNorm, no zero init, no skips);
- ``decay_0.3``, ``decay_0.4``: the released recipe (decay, no final LayerNorm, zero init, skips);
- ``decay_0.3_no_skips``: decay without the encoder-to-decoder skips;
- ``skips_no_decay``: the recipe with ``shortcut_decay=0``;
- for investigation only (``--variants``): ``decay_0.53`` and ``decay_0.68`` (this depth's decay for ViT-B's
  ``alpha_eff`` at 0.3 and 0.4), ``decay_0.3_cosine`` (the cosine schedule), ``decay_0.3_last_skip_only``
  and ``plain_one_decoder_block`` (a one-block decoder: the decayed model keeps only the last block's skip),
  ``decay_0.3_alone`` and ``decay_0.3_alone_one_decoder_block`` (the decay on upstream ViTMAE, no recipe).

Runs are resumable: a finished run (its ``scores.json``) is never redone, an interrupted one resumes from its
last checkpoint. Output in ``--output``: ``results.json``, ``results.md`` (mean ± std over seeds) and
``depth.png`` (kNN and effective rank against depth per variant).

    python experiments/reproduce_mae.py                 # 5 variants x 3 seeds, 77 minutes on 2 cores
    python experiments/reproduce_mae.py --smoke         # tiny models and budget: checks the pipeline only
    python experiments/reproduce_mae.py --variants plain decay_0.53 --seeds 0 --output runs/investigate
    python experiments/reproduce_mae.py --dataset embedded:cluttered-mnist --image-size 48 --output runs/cl
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training_scripts" / "train_mae.py"
# Upstream ViTMAE: every part of the released recipe switched off.
RECIPE_OFF = [
    "--encoder_final_layernorm", "--no_zero_init_residual_branches", "--no_decoder_skip_connections",
]  # fmt: skip
VARIANTS = {
    "plain": ["--shortcut_decay", "0", *RECIPE_OFF],
    "decay_0.3": ["--shortcut_decay", "0.3"],
    "decay_0.4": ["--shortcut_decay", "0.4"],
    "decay_0.3_no_skips": ["--shortcut_decay", "0.3", "--no_decoder_skip_connections"],
    "skips_no_decay": ["--shortcut_decay", "0"],
    # Investigation variants (not run by default). alpha_eff, the product of all coefficients, is what the
    # paper reports a good range for (1e-3 to 1e-2); at 6 blocks (12 sublayers) decay 0.3 gives 0.13, while
    # ViT-B's 24 sublayers give 0.018. Decay 0.53 and 0.68 give this depth ViT-B's alpha_eff at 0.3 and 0.4.
    "decay_0.53": ["--shortcut_decay", "0.53"],
    "decay_0.68": ["--shortcut_decay", "0.68"],
    "decay_0.3_cosine": ["--shortcut_decay", "0.3", "--shortcut_schedule", "cosine"],
    # Skip layers: with one decoder block only the last encoder block feeds the decoder (one skip), as in
    # plain MAE, where the decoder reads the last block alone; the plain twin has the same one-block decoder.
    "decay_0.3_last_skip_only": ["--shortcut_decay", "0.3", "--decoder_num_hidden_layers", "1"],
    "plain_one_decoder_block": ["--shortcut_decay", "0", *RECIPE_OFF, "--decoder_num_hidden_layers", "1"],
    # The decay alone on upstream ViTMAE (final LayerNorm, default init, no skips), without the recipe.
    "decay_0.3_alone": ["--shortcut_decay", "0.3", *RECIPE_OFF],
    "decay_0.3_alone_one_decoder_block": [
        "--shortcut_decay", "0.3", *RECIPE_OFF, "--decoder_num_hidden_layers", "1",
    ],
}  # fmt: skip
DEFAULT_VARIANTS = ("plain", "decay_0.3", "decay_0.4", "decay_0.3_no_skips", "skips_no_decay")
SMOKE_MODEL = [
    "--image_size", "16", "--patch_size", "4", "--hidden_size", "32", "--num_hidden_layers", "2",
    "--num_attention_heads", "2", "--intermediate_size", "64", "--decoder_hidden_size", "16",
    "--decoder_num_hidden_layers", "1", "--decoder_num_attention_heads", "2",
    "--decoder_intermediate_size", "32", "--per_device_train_batch_size", "32", "--max_train_samples", "256",
]  # fmt: skip
METRICS = ("knn_top1", "linear_probe_top1", "effective_rank", "reconstruction_loss", "alpha_eff")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=Path("runs/reproduce_mae"))
    parser.add_argument(
        "--dataset",
        default="embedded:mnist",
        help="training and evaluation images: embedded:mnist, embedded:cluttered-mnist, a Hub id or a folder",
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="model input size (default: the script's, 28)"
    )
    parser.add_argument(
        "--train-args",
        default="",
        help="extra train_mae.py flags given to every variant alike (model size, patch size), e.g. "
        "'--patch_size 6 --hidden_size 128'",
    )
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-train-steps", type=int, default=600, help="optimisation steps per run")
    parser.add_argument("--eval-train-samples", type=int, default=5000, help="kNN bank / probe training set")
    parser.add_argument("--eval-test-samples", type=int, default=2000)
    parser.add_argument("--probe-epochs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--smoke", action="store_true", help="tiny models and budget (2 seeds, 4 steps)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.max_train_steps = args.seeds[:2], 4
        args.eval_train_samples, args.eval_test_samples, args.probe_epochs = 200, 100, 5
    for name in ("max_train_steps", "eval_train_samples", "eval_test_samples", "probe_epochs", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.image_size is not None and args.image_size < 1:
        parser.error(f"--image-size must be >= 1; got {args.image_size}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct; got {args.seeds}")
    return args


def train_command(run_dir: Path, variant: str, seed: int, args: argparse.Namespace) -> list[str]:
    """``accelerate launch training_scripts/train_mae.py ...`` for one (variant, seed)."""
    size = ["--image_size", str(args.image_size)] if args.image_size else []
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--num_cpu_threads_per_process", str(args.threads), str(SCRIPT),
        "--output_dir", str(run_dir), "--seed", str(seed), "--max_train_steps", str(args.max_train_steps),
        "--eval_every", "0", "--checkpointing_steps", str(max(1, args.max_train_steps // 4)),
        "--resume_from_checkpoint", "latest", "--dataset_name", args.dataset, *size,
        *shlex.split(args.train_args), *VARIANTS[variant], *(SMOKE_MODEL if args.smoke else []),
    ]  # fmt: skip


def train(run_dir: Path, variant: str, seed: int, args: argparse.Namespace) -> None:
    """One training run through ``accelerate launch``; resumes from its last checkpoint if interrupted."""
    log = run_dir.with_suffix(".log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:
        result = subprocess.run(
            train_command(run_dir, variant, seed, args), stdout=handle, stderr=subprocess.STDOUT
        )
    if result.returncode != 0:
        raise SystemExit(f"error: training {variant} (seed {seed}) failed; see {log}")


def reconstruction_loss(run_dir: Path, images, batch_size: int = 256) -> float:
    """Mean masked-reconstruction loss on ``images`` with masks fixed by a seeded generator."""
    from transformers import AutoImageProcessor

    from hf_resdecay import ViTMAEDecayForPreTraining

    model = ViTMAEDecayForPreTraining.from_pretrained(run_dir).eval()
    processor = AutoImageProcessor.from_pretrained(run_dir)
    num_patches = model.vit.embeddings.patch_embeddings.num_patches
    generator = torch.Generator().manual_seed(0)
    channels = "RGB" if model.config.num_channels == 3 else "L"
    losses = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = [image.convert(channels) for image in images[start : start + batch_size]]
            pixels = processor(images=batch, return_tensors="pt")["pixel_values"]
            noise = torch.rand(len(batch), num_patches, generator=generator)
            losses.append(model(pixel_values=pixels, noise=noise).loss.item() * len(batch))
    return sum(losses) / len(images)


def score(run_dir: Path, train_set, test_set, args: argparse.Namespace) -> dict:
    """Every number of one run, written atomically to ``scores.json`` (the mark of a finished run)."""
    from hf_resdecay.atomic import write_json_atomic
    from hf_resdecay.evaluation import evaluate_representations

    results = evaluate_representations(
        str(run_dir),
        train_set,
        test_set,
        layers="all",
        probe_epochs=args.probe_epochs,
        cache=False,
        progress=False,
    )
    trained = json.loads((run_dir / "results.json").read_text())
    scores = {
        **results["summary"],
        "reconstruction_loss": reconstruction_loss(run_dir, test_set["image"]),
        "alpha_eff": trained["model"]["alpha_eff"],
        "final_train_loss": trained["final_loss"],
        "knn_top1_per_layer": results["knn"]["top1"],
        "effective_rank_per_layer": results["effective_rank"]["values"],
        "layers": results["layers"],
    }
    write_json_atomic(scores, run_dir / "scores.json")
    return scores


def mean_patch(images: np.ndarray, patch_size: int) -> np.ndarray:
    """Each image's mean ``patch_size`` x ``patch_size`` patch, flattened: what a mean-pooled linear patch
    embedding can see of an image (layer 0's mean-pooled tokens are an affine function of it).

    ``images`` is ``(N, H, W)`` or ``(N, H, W, C)``; rows and columns past the last whole patch are dropped.
    """
    n, height, width = images.shape[:3]
    rows, cols = height // patch_size, width // patch_size
    cropped = images[:, : rows * patch_size, : cols * patch_size]
    patches = cropped.reshape(n, rows, patch_size, cols, patch_size, *images.shape[3:])
    return patches.mean(axis=(1, 3)).reshape(n, -1)


def pixel_reference(train_set, test_set, patch_size: int) -> dict[str, float]:
    """kNN top-1 and effective rank of the raw pixels of the same images: the bar features should clear.

    Also the kNN of each image's mean ``patch_size`` patch (:func:`mean_patch`): the floor of a
    mean-pooled token feature, which keeps the pixel statistics but not the layout.
    """
    from hf_resdecay.evaluation import effective_rank, knn_accuracy

    def pixels(dataset) -> np.ndarray:
        return np.stack([np.asarray(image, dtype=np.float32) / 255 for image in dataset["image"]])

    train, test = pixels(train_set), pixels(test_set)
    train_labels, test_labels = np.asarray(train_set["label"]), np.asarray(test_set["label"])
    flat_train, flat_test = train.reshape(len(train), -1), test.reshape(len(test), -1)
    patch_train, patch_test = mean_patch(train, patch_size), mean_patch(test, patch_size)
    return {
        "knn_top1": knn_accuracy(flat_train, train_labels, flat_test, test_labels)["top1"],
        "effective_rank": effective_rank(flat_train),
        "mean_patch_size": patch_size,
        "mean_patch_knn_top1": knn_accuracy(patch_train, train_labels, patch_test, test_labels)["top1"],
    }


def summarise(runs: dict[str, dict[int, dict]]) -> dict:
    """Mean and sample standard deviation over seeds of every metric, per variant.

    The standard deviation is ``None`` for a single seed: it is undefined there, not zero.
    """
    summary = {}
    for variant, by_seed in runs.items():
        entry = {"seeds": sorted(by_seed)}
        for metric in (*METRICS, "final_train_loss"):
            values = [scores[metric] for scores in by_seed.values()]
            entry[metric] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else None,
                "values": values,
            }
        for curve in ("knn_top1_per_layer", "effective_rank_per_layer"):
            entry[curve] = np.mean([scores[curve] for scores in by_seed.values()], axis=0).tolist()
        summary[variant] = entry
    return summary


def _mean_std(metric: dict, digits: int = 2) -> str:
    if metric["std"] is None:
        return f"{metric['mean']:.{digits}f}"
    return f"{metric['mean']:.{digits}f} ± {metric['std']:.{digits}f}"


def markdown_table(summary: dict) -> str:
    header = "| variant | alpha_eff | kNN top-1 (%) | linear probe (%) | effective rank | recon. loss |"
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for variant, entry in summary.items():
        cells = [
            _mean_std(entry["knn_top1"]),
            _mean_std(entry["linear_probe_top1"]),
            _mean_std(entry["effective_rank"]),
            _mean_std(entry["reconstruction_loss"], 4),
        ]
        lines.append(f"| {variant} | {entry['alpha_eff']['mean']:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hf_resdecay.atomic import save_figure_atomic

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for variant, entry in summary.items():
        layers = range(len(entry["knn_top1_per_layer"]))
        axes[0].plot(layers, entry["knn_top1_per_layer"], marker="o", label=variant)
        axes[1].plot(layers, entry["effective_rank_per_layer"], marker="o", label=variant)
    for axis, label in zip(axes, ("kNN top-1 (%)", "effective rank (RankMe)"), strict=True):
        axis.set_xlabel("layer (0 = embeddings)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    columns = min(3, len(summary))
    figure.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=columns, frameon=False)
    figure.suptitle("decayed vs plain MAE (mean over seeds)")
    figure.tight_layout(rect=(0, 0.06 * -(-len(summary) // columns), 1, 1))
    return save_figure_atomic(figure, path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from tqdm.auto import tqdm

    from hf_resdecay.atomic import atomic_write, write_json_atomic
    from hf_resdecay.data import load_image_dataset, subset

    train_set = subset(load_image_dataset(args.dataset, split="train"), args.eval_train_samples, seed=1234)
    test_set = subset(load_image_dataset(args.dataset, split="test"), args.eval_test_samples, seed=1234)
    runs: dict[str, dict[int, dict]] = {}
    pairs = [(variant, seed) for variant in args.variants for seed in args.seeds]
    for variant, seed in tqdm(pairs, desc="runs", unit="run"):
        run_dir = args.output / variant / f"seed-{seed}"
        done = run_dir / "scores.json"
        if not done.exists():
            train(run_dir, variant, seed, args)
            score(run_dir, train_set, test_set, args)
        runs.setdefault(variant, {})[seed] = json.loads(done.read_text())
    summary = summarise(runs)
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    first_run = args.output / args.variants[0] / f"seed-{args.seeds[0]}" / "config.json"
    reference = pixel_reference(train_set, test_set, json.loads(first_run.read_text())["patch_size"])
    write_json_atomic(
        {"settings": settings, "variants": summary, "raw_pixels": reference}, args.output / "results.json"
    )
    table = markdown_table(summary) + (
        f"\nRaw pixels of the same images: kNN top-1 {reference['knn_top1']:.2f}%, "
        f"effective rank {reference['effective_rank']:.2f}; their mean {reference['mean_patch_size']}x"
        f"{reference['mean_patch_size']} patch (the floor of a mean-pooled feature): kNN top-1 "
        f"{reference['mean_patch_knn_top1']:.2f}%.\n"
    )
    with atomic_write(args.output / "results.md") as handle:
        handle.write(table)
    plot(summary, args.output / "depth.png")
    print(table)
    print(
        f"results: {args.output / 'results.json'}, {args.output / 'results.md'}, {args.output / 'depth.png'}"
    )
    return summary


if __name__ == "__main__":
    main()
