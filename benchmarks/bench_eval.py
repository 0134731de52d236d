"""Evaluation speed against reference implementations, as ratios measured in the same run.

- kNN: ``knn_predict`` on 50k x 10k x 768 float32 features against scikit-learn's
  ``KNeighborsClassifier(algorithm="brute", metric="cosine")`` with the same vote weighting; each runs in its
  own process so its peak resident memory can be reported; the predictions must agree.
- Fréchet distance on 2048-d features against the ``scipy.linalg.sqrtm`` formula.
- kNN against the bare floor (one GEMM and a top-k per test chunk on pre-normalised features), and at
  200k x 768 with bfloat16 similarities against float32.
- Feature extraction throughput (images/s) of a ViT-S-like decayed MAE encoder on JPEGs, with DataLoader
  workers against decoding in the main process (the serial path).
- Peak resident memory of ``hf-resdecay evaluate --layers all`` on 20k images, against an older checkout
  (``--baseline-src``) when given.

    python benchmarks/bench_eval.py            # full sizes, tens of minutes on 2 CPU threads
    python benchmarks/bench_eval.py --quick    # 10x smaller
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import resource
import time

import numpy as np


def _data(train: int, test: int, dim: int, classes: int = 100, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    train_labels = rng.integers(0, classes, train)
    test_labels = rng.integers(0, classes, test)
    noise = 4.0
    train_x = centres[train_labels] + noise * rng.normal(size=(train, dim)).astype(np.float32)
    test_x = centres[test_labels] + noise * rng.normal(size=(test, dim)).astype(np.float32)
    return train_x, train_labels, test_x


def _knn_ours(sizes):
    from hf_resdecay.evaluation import knn_predict

    train, labels, test = _data(*sizes)
    start = time.perf_counter()
    predictions = knn_predict(train, labels, test).numpy()
    seconds = time.perf_counter() - start
    return seconds, predictions, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _knn_sklearn(sizes):
    from sklearn.neighbors import KNeighborsClassifier

    train, labels, test = _data(*sizes)
    start = time.perf_counter()
    model = KNeighborsClassifier(
        n_neighbors=20, algorithm="brute", metric="cosine", weights=lambda d: np.exp((1.0 - d) / 0.07)
    )
    predictions = model.fit(train, labels).predict(test)
    seconds = time.perf_counter() - start
    return seconds, predictions, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_fresh_process(function, *args):
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _bench_frechet(samples: int, dim: int) -> tuple[float, float, float, float]:
    from hf_resdecay.evaluation import frechet_distance

    rng = np.random.default_rng(1)
    a = rng.normal(size=(samples, dim))
    b = rng.normal(size=(samples, dim)) @ np.diag(np.linspace(0.5, 1.5, dim)) + 0.1
    start = time.perf_counter()
    ours = frechet_distance(a, b)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    reference = _scipy_frechet(a, b)
    reference_s = time.perf_counter() - start
    return ours_s, reference_s, ours, reference


def _knn_floor(sizes):
    """The bare work of kNN: a GEMM per test chunk of pre-normalised features and its top-k, nothing else."""
    import torch
    import torch.nn.functional as F

    train, _, test = _data(*sizes)
    bank, queries = F.normalize(torch.from_numpy(train), dim=1), F.normalize(torch.from_numpy(test), dim=1)
    start = time.perf_counter()
    for first in range(0, len(queries), 1024):
        (queries[first : first + 1024] @ bank.T).topk(20, dim=1)
    return time.perf_counter() - start


def _knn_dtype(sizes, dtype):
    from hf_resdecay.evaluation import knn_predict

    train, labels, test = _data(*sizes)
    start = time.perf_counter()
    predictions = knn_predict(train, labels, test, device="cpu", dtype=dtype).numpy()
    return time.perf_counter() - start, predictions


def _cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); else torch emulates it."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _jpeg_dataset(images: int, size: int, folder: str | None = None):
    """ImageNet-like inputs: ``images`` random-texture JPEGs of ``size`` px, in 10 classes."""
    import io

    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 255, size=(images, size // 8, size // 8, 3), dtype=np.uint8)
    encoded = []
    for tile in coarse:
        buffer = io.BytesIO()
        PILImage.fromarray(tile).resize((size, size), PILImage.BILINEAR).save(
            buffer, format="JPEG", quality=90
        )
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    features = Features({"image": Image(), "label": ClassLabel(num_classes=10)})
    dataset = Dataset.from_dict(
        {"image": encoded, "label": (np.arange(images) % 10).tolist()}, features=features
    )
    if folder is not None:
        dataset.save_to_disk(folder)
    return dataset


FEATURE_MODELS = {
    "ViT-S/8 decayed MAE, 64 px": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                       intermediate_size=1536, image_size=64, patch_size=8),
    "train_mae.py's default encoder (6 x 192, 28 px)": dict(hidden_size=192, num_hidden_layers=6,
                                                            num_attention_heads=3, intermediate_size=768,
                                                            image_size=28, patch_size=4),
}  # fmt: skip
"""The encoders of the extraction rows: a ViT-S-like one, and the small one the README's first run trains."""


def _bench_features(name: str, images: int, rounds: int, workers: int) -> tuple[float, float, float]:
    """images/s with ``workers`` DataLoader workers and with none (decoding in the main process, as the
    serial path did), alternating rounds; and the share of the serial time spent decoding, preprocessing."""
    from transformers import ViTImageProcessorPil

    from hf_resdecay import ViTMAEDecayConfig, ViTMAEDecayModel
    from hf_resdecay.evaluation import extract_features

    config = ViTMAEDecayConfig(**FEATURE_MODELS[name])
    model = ViTMAEDecayModel(config).eval()
    size = {"height": config.image_size, "width": config.image_size}
    processor = ViTImageProcessorPil(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    dataset = _jpeg_dataset(images, 256)
    options = dict(image_processor=processor, batch_size=64, cache=False, progress=False)
    speeds: dict[str, list[float]] = {"workers": [], "serial": []}
    for _ in range(rounds):
        for kind, count in (("serial", 0), ("workers", workers)):
            start = time.perf_counter()
            extract_features(model, dataset, num_workers=count, **options)
            speeds[kind].append(images / (time.perf_counter() - start))
    start = time.perf_counter()
    for first in range(0, images, 64):
        rows = dataset[first : first + 64]
        processor(images=[image.convert("RGB") for image in rows["image"]], return_tensors="pt")
    decode_share = (time.perf_counter() - start) / (images / np.median(speeds["serial"]))
    return float(np.median(speeds["workers"])), float(np.median(speeds["serial"])), decode_share


def _peak_rss_of_evaluate(src: str | None, model: str, data: str, cache: str) -> float:
    """Peak resident memory (MB) of ``hf-resdecay evaluate --layers all`` in a fresh process, with the package
    imported from ``src`` (an older checkout's ``src`` folder) or the installed one."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_RESDECAY_CACHE": cache, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if src is not None:
        env["PYTHONPATH"] = src
    command = [
        sys.executable,
        "-m",
        "hf_resdecay.cli",
        "evaluate",
        model,
        "--dataset",
        data,
        "--layers",
        "all",
    ]
    command += ["--metrics", "knn,effective_rank", "--output", os.path.join(cache, "results.json")]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise RuntimeError(process.stderr.read().decode()[-2000:])
    return usage.ru_maxrss / 1024


def _bench_layers_all_memory(images: int, baseline_src: str | None) -> tuple[float, float | None, str]:
    """Peak RSS of evaluate --layers all on ``images`` training images (+ a tenth as test) with a ViT-B-wide
    encoder (12 blocks of width 768) on 2 tokens per image, so features, not compute, dominate."""
    import tempfile

    from datasets import DatasetDict
    from transformers import ViTImageProcessorPil

    from hf_resdecay import ViTMAEDecayConfig, ViTMAEDecayModel

    with tempfile.TemporaryDirectory() as folder:
        config = ViTMAEDecayConfig(image_size=16, patch_size=16, num_channels=3)  # ViT-B widths, 1 patch
        ViTMAEDecayModel(config).save_pretrained(f"{folder}/model")
        ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(f"{folder}/model")
        train, test = _jpeg_dataset(images, 16), _jpeg_dataset(images // 10, 16)
        DatasetDict({"train": train, "test": test}).save_to_disk(f"{folder}/data")
        ours = _peak_rss_of_evaluate(None, f"{folder}/model", f"{folder}/data", tempfile.mkdtemp(dir=folder))
        baseline = None
        if baseline_src is not None:
            baseline = _peak_rss_of_evaluate(
                baseline_src, f"{folder}/model", f"{folder}/data", tempfile.mkdtemp(dir=folder)
            )
        features_mb = (images + images // 10) * 13 * 768 * 4 / 2**20
    return (
        ours,
        baseline,
        f"{images:,} + {images // 10:,} images, 13 layers x 768: {features_mb:.0f} MB of features",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="10x smaller problems")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the timed comparisons")
    parser.add_argument("--feature-images", type=int, default=1024, help="images of the extraction rows")
    parser.add_argument(
        "--feature-workers", type=int, default=1, help="DataLoader workers of the extraction rows (default 1)"
    )
    parser.add_argument(
        "--baseline-src",
        default=None,
        help="an older checkout's src folder (e.g. from 'git archive <commit> src'): the memory row then "
        "measures it too and prints the ratio",
    )
    parser.add_argument(
        "--skip", default="", help="comma-separated rows to skip: knn,knn200k,frechet,features,memory"
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    skip = set(args.skip.split(","))
    scale = 10 if args.quick else 1
    sizes = (50_000 // scale, 10_000 // scale, 768)
    rows = []

    if "knn" not in skip:
        ratios_sk, ratios_floor, agree = [], [], []
        for _ in range(args.rounds):
            ours_s, ours_pred, ours_mb = _in_fresh_process(_knn_ours, sizes)
            sk_s, sk_pred, sk_mb = _in_fresh_process(_knn_sklearn, sizes)
            floor_s = _in_fresh_process(_knn_floor, sizes)
            ratios_sk.append(sk_s / ours_s)
            ratios_floor.append(ours_s / floor_s)
            agree.append(float(np.mean(ours_pred == sk_pred)))
        rows.append(
            f"| kNN {sizes[0]:,} x {sizes[1]:,} x {sizes[2]} float32 | {ours_s:.2f} s | {sk_s:.2f} s "
            f"(sklearn brute) | {np.median(ratios_sk):.2f}x | {np.median(ratios_floor):.3f}x the bare GEMM + "
            f"top-k ({floor_s:.2f} s); "
            f"predictions agree {100 * min(agree):.2f}%; peak RSS {ours_mb:.0f} vs {sk_mb:.0f} MB; "
            f"median of {args.rounds} rounds |"
        )
    if "knn200k" not in skip:
        big = (200_000 // scale, 10_000 // scale, 768)
        fp32_s, fp32_pred = _in_fresh_process(_knn_dtype, big, "float32")
        bf16_s, bf16_pred = _in_fresh_process(_knn_dtype, big, "bfloat16")
        native = "native bf16" if _cpu_has_bf16() else "no native bf16 on this CPU (emulated)"
        rows.append(
            f"| kNN {big[0]:,} x {big[1]:,} x 768, bfloat16 similarities | {bf16_s:.2f} s | {fp32_s:.2f} s "
            f"(float32) | {fp32_s / bf16_s:.2f}x | {native}; predictions agree "
            f"{100 * np.mean(fp32_pred == bf16_pred):.2f}% |"
        )
    if "frechet" not in skip:
        fd_ours, fd_ref, fd_value, fd_reference = _bench_frechet(10_000 // scale, 2048)
        rows.append(
            f"| Fréchet distance {10_000 // scale}x2048 | {fd_ours:.2f} s | {fd_ref:.2f} s (scipy sqrtm) | "
            f"{fd_ref / fd_ours:.1f}x | values {fd_value:.6f} vs {fd_reference:.6f} |"
        )
    if "features" not in skip:
        for name in FEATURE_MODELS:
            workers, serial, decode = _bench_features(
                name, args.feature_images // scale, args.rounds, args.feature_workers
            )
            rows.append(
                f"| features, {name}, from 256 px JPEGs, {args.feature_workers} DataLoader worker(s) | "
                f"{workers:.1f} images/s | "
                f"{serial:.1f} images/s (decoding in the main process) | {workers / serial:.2f}x | "
                f"decoding and preprocessing are {100 * decode:.0f}% of the serial time; "
                f"median of {args.rounds} rounds |"
            )
    if "memory" not in skip:
        ours, baseline, what = _bench_layers_all_memory(20_000 // scale, args.baseline_src)
        reference = f"{baseline:.0f} MB (--baseline-src)" if baseline else "(no --baseline-src)"
        ratio = f"{baseline / ours:.2f}x less" if baseline else ""
        rows.append(f"| peak RSS, evaluate --layers all | {ours:.0f} MB | {reference} | {ratio} | {what} |")

    print(f"torch {torch.__version__}, {args.threads} threads")
    print("| benchmark | ours | reference | ratio | notes |")
    print("|---|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
