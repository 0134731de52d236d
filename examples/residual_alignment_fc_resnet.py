"""Residual alignment (arXiv 2401.09018) reproduced on CPU: fully-connected ResNets on scikit-learn's digits.

The small case of the paper (design §2): ``Linear(64 -> 128)``, ``L`` blocks ``x + W2 relu(W1 x)``,
``Linear(128 -> 10)``, trained with SGD (lr 0.01, momentum 0.9, **weight decay 1e-2**) for 600 epochs, for
``L`` = 4, 8 and 16, each with skips and without (``x -> W2 relu(W1 x)``), next to the untrained ResNet. Each
model's residual Jacobians are analysed on class-balanced training samples with
:func:`hf_resdecay.alignment.analyze` (``C = 10``; blocks without skips are analysed whole, ``alpha = 0``).

Expected with skips: RA3 numerical rank about ``C`` and most Jacobian energy in the top ``C`` directions, RA2
top singular vectors aligned (``|<u_k, v_k>|`` well above the untrained network's chance level), and RA4
``s_1 * L`` about constant, a log-log slope of ``s_1`` against ``L`` near -1.

    python examples/residual_alignment_fc_resnet.py                  # 600 epochs, a few minutes on 2 cores
    python examples/residual_alignment_fc_resnet.py --quick          # 150 epochs, depths 2/4/8
    python examples/residual_alignment_fc_resnet.py --output fc_resnet_alignment --threads 2

Needs scikit-learn (for ``load_digits``) and matplotlib. Prints two markdown tables and writes each model's
``report.json`` plus ``s1_per_block.png`` and ``depth_scaling.png`` under ``--output``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hf_resdecay.alignment import AlignmentReport, analyze, depth_scaling, plot_depth_scaling
from hf_resdecay.alignment.command import select_samples

VARIANTS = ("yes", "no", "untrained")
"""``skips`` column: trained with skips, trained without skips, untrained with skips."""

NUM_CLASSES = 10


class FCBlock(nn.Module):
    """``x -> x + W2 relu(W1 x)`` (``skip=True``) or ``x -> W2 relu(W1 x)``.

    With skips the weights keep PyTorch's default initialisation. Without skips they get He initialisation
    (variance-preserving through ``relu``), else a plain stack of 4 or more blocks stays at chance accuracy
    and the comparison would be against a network that never trained.
    """

    def __init__(self, width: int, skip: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.skip = skip
        if not skip:
            nn.init.kaiming_normal_(self.fc1.weight, nonlinearity="relu")
            nn.init.kaiming_normal_(self.fc2.weight, nonlinearity="linear")
            nn.init.zeros_(self.fc1.bias)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.fc2(torch.relu(self.fc1(x)))
        return x + branch if self.skip else branch


class FCResNet(nn.Module):
    """``Linear(in -> width)``, ``depth`` :class:`FCBlock` s, ``Linear(width -> classes)``."""

    def __init__(
        self, depth: int, width: int = 128, in_features: int = 64, num_classes: int = 10, skip: bool = True
    ) -> None:
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(FCBlock(width, skip) for _ in range(depth))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@dataclass
class Digits:
    """Standardised 8x8 digits (64 features), stratified 75/25 split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(seed: int = 0) -> Digits:
    """scikit-learn's 1,797 digits, split 1,347 / 450 (stratified), standardised with training statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )
    x_train, x_test = torch.tensor(x_train, dtype=torch.float32), torch.tensor(x_test, dtype=torch.float32)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-3)
    return Digits((x_train - mean) / std, torch.tensor(y_train), (x_test - mean) / std, torch.tensor(y_test))


def train(
    model: nn.Module,
    data: Digits,
    epochs: int,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-2,
    batch_size: int = 128,
    seed: int = 0,
) -> nn.Module:
    """Cross-entropy, SGD with momentum and weight decay, shuffled batches; returns ``model`` in eval mode."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    count = data.x_train.shape[0]
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(data.x_train[batch]), data.y_train[batch]).backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean() * 100)


def analyse(
    model: FCResNet, data: Digits, samples: int = 100, top_k: int = 16, seed: int = 0, name: str = "fc"
) -> AlignmentReport:
    """RA1-RA4 and neural collapse of ``model`` on ``samples`` class-balanced training images."""
    indices = select_samples(data.y_train.tolist(), data.x_train.shape[0], samples, seed)
    skip = model.blocks[0].skip
    return analyze(
        model,
        data.x_train[indices],
        data.y_train[indices],
        top_k=top_k,
        blocks=list(model.blocks),
        alphas=1.0 if skip else 0.0,
        num_classes=NUM_CLASSES,
        classifier=model.head,
        method="dense",
        seed=seed,
        model_name=name,
    )


@dataclass
class Result:
    """One trained (or untrained) model and its report."""

    depth: int
    skips: str
    """One of :data:`VARIANTS`."""
    train_acc: float
    test_acc: float
    report: AlignmentReport
    seconds: float


def run_experiments(
    depths: Sequence[int] = (4, 8, 16),
    epochs: int = 600,
    samples: int = 100,
    top_k: int = 16,
    weight_decay: float = 1e-2,
    width: int = 128,
    seed: int = 0,
    variants: Sequence[str] = VARIANTS,
    verbose: bool = False,
) -> list[Result]:
    """Train and analyse one model per (depth, variant); same initialisation seed for every variant."""
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"variants must be among {VARIANTS}; got {unknown}")
    data = load_digits_split(seed)
    results = []
    for depth in depths:
        for variant in variants:
            start = time.perf_counter()
            torch.manual_seed(seed)
            model = FCResNet(depth, width=width, num_classes=NUM_CLASSES, skip=variant != "no")
            if variant != "untrained":
                train(model, data, epochs, weight_decay=weight_decay, seed=seed)
            model.eval()
            name = f"fc-resnet L={depth} skips={variant}"
            report = analyse(model, data, samples, top_k, seed, name)
            result = Result(
                depth,
                variant,
                accuracy(model, data.x_train, data.y_train),
                accuracy(model, data.x_test, data.y_test),
                report,
                time.perf_counter() - start,
            )
            results.append(result)
            if verbose:
                print(f"  {name}: test acc {result.test_acc:.1f}% ({result.seconds:.1f} s)", flush=True)
    return results


def median_rank(report: AlignmentReport) -> float:
    """RA3: median over blocks of the mean numerical rank."""
    return statistics.median(block.numerical_rank for block in report.blocks)


def _number(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def results_table(results: Sequence[Result]) -> str:
    """Markdown table, one row per model."""
    lines = [
        "| depth | skips | train acc | test acc | RA3 rank (median) | top-C energy | RA2 \\|<u,v>\\| top-1 "
        "/ top-C | RA2 coupling diag | RA1 line shape | NC1 | s1 per block | s1·L |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for result in results:
        summary = result.report.summary()
        s1 = " ".join(f"{value:.3g}" for value in result.report.s1)
        lines.append(
            f"| {result.depth} | {result.skips} | {result.train_acc:.1f} | {result.test_acc:.1f} | "
            f"{median_rank(result.report):.1f} | {_number(summary['ra3_energy_top_c'])} | "
            f"{_number(summary['ra2_alignment_top1'])} / {_number(summary['ra2_alignment_top_k'])} | "
            f"{_number(summary['ra2_coupling_diag'])} | {_number(summary['ra1_line_shape'], '.2f')} | "
            f"{_number(summary['nc1'], '.3g')} | {s1} | {_number(summary['ra4_s1_times_depth'], '.3g')} |"
        )
    return "\n".join(lines)


def _by_variant(results: Sequence[Result]) -> dict[str, list[Result]]:
    groups: dict[str, list[Result]] = {}
    for result in results:
        groups.setdefault(result.skips, []).append(result)
    return groups


def depth_scaling_table(results: Sequence[Result]) -> str:
    """Markdown table of RA4 across depths: log-log slope of mean ``s_1`` against ``L`` per variant."""
    lines = ["| skips | depths | mean s1 | RA4 log-log slope | R² |", "|---|---|---|---:|---:|"]
    for variant, group in _by_variant(results).items():
        if len({result.depth for result in group}) < 2:
            continue
        fit = depth_scaling([result.report for result in group])
        lines.append(
            f"| {variant} | {', '.join(map(str, fit.depths))} | "
            f"{', '.join(f'{value:.3g}' for value in fit.s1)} | {fit.slope:.2f} | {fit.r2:.2f} |"
        )
    return "\n".join(lines)


def save_outputs(results: Sequence[Result], output_dir: str | Path) -> list[Path]:
    """Each model's ``report.json``, ``s1_per_block.png`` (``s_1 * L`` against relative depth, one panel per
    variant) and ``depth_scaling.png`` (RA4 fit of the trained ResNets with skips)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    paths = [
        result.report.save_json(output_dir / f"L{result.depth}_skips-{result.skips}" / "report.json")
        for result in results
    ]
    groups = _by_variant(results)
    figure, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), sharey=True, squeeze=False)
    for axis, (variant, group) in zip(axes[0], groups.items(), strict=True):
        for result in group:
            depth = result.depth
            xs = [(index + 0.5) / depth for index in range(depth)]
            axis.plot(xs, [value * depth for value in result.report.s1], marker="o", label=f"L = {depth}")
        axis.set_title(f"skips: {variant}")
        axis.set_xlabel("relative depth (block + 0.5) / L")
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    axes[0][0].set_ylabel("s_1 * L (flat and equal across L under RA4)")
    figure.suptitle("Top singular value of each residual Jacobian, scaled by depth")
    paths.append(output_dir / "s1_per_block.png")
    figure.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(figure)
    trained = groups.get("yes", [])
    if len({result.depth for result in trained}) >= 2:
        paths.append(plot_depth_scaling([r.report for r in trained], output_dir / "depth_scaling.png"))
    return paths


def main(argv: Sequence[str] | None = None) -> list[Result]:
    """Command line: train, analyse, print the tables, save reports and plots."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="depths 2/4/8, 150 epochs, 50 samples")
    parser.add_argument("--depths", type=int, nargs="+", default=None, help="default 4 8 16 (quick: 2 4 8)")
    parser.add_argument("--epochs", type=int, default=None, help="default 600 (quick: 150)")
    parser.add_argument("--samples", type=int, default=None, help="analysed samples (default 100, quick 50)")
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("fc_resnet_alignment"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    depths = args.depths or ([2, 4, 8] if args.quick else [4, 8, 16])
    epochs = args.epochs or (150 if args.quick else 600)
    samples = args.samples or (50 if args.quick else 100)
    print(
        f"FC ResNets on digits: depths {depths}, {epochs} epochs, weight decay {args.weight_decay}, "
        f"{samples} analysed samples, top-{args.top_k}, C = {NUM_CLASSES}, {args.threads} threads"
    )
    start = time.perf_counter()
    results = run_experiments(
        depths, epochs, samples, args.top_k, args.weight_decay, seed=args.seed, verbose=True
    )
    print()
    print(results_table(results))
    print()
    print(depth_scaling_table(results))
    print()
    paths = save_outputs(results, args.output)
    print(f"wrote {len(paths)} files under {args.output} ({time.perf_counter() - start:.0f} s in all)")
    return results


if __name__ == "__main__":
    main()
