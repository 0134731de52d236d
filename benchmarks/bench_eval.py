"""Evaluation speed against reference implementations, as ratios measured in the same run.

- kNN: ``knn_predict`` on 50k x 10k x 768 float32 features against scikit-learn's
  ``KNeighborsClassifier(algorithm="brute", metric="cosine")`` with the same vote weighting; each runs in its
  own process so its peak resident memory can be reported; the predictions must agree.
- Fréchet distance on 2048-d features against the ``scipy.linalg.sqrtm`` formula.
- Feature extraction throughput (images/s) of a ViT-S-like decayed MAE encoder.

    python benchmarks/bench_eval.py            # full sizes, a few minutes on 2 CPU threads
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


def _bench_features(images: int) -> float:
    import torch
    from datasets import Dataset, Features, Image

    from hf_resdecay import ViTMAEDecayConfig, ViTMAEDecayModel
    from hf_resdecay.evaluation import extract_features

    config = ViTMAEDecayConfig(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        image_size=64,
        patch_size=8,
    )
    model = ViTMAEDecayModel(config)
    pixels = np.random.default_rng(0).integers(0, 255, size=(images, 64, 64, 3), dtype=np.uint8)
    dataset = Dataset.from_dict({"image": list(pixels)}, features=Features({"image": Image()}))
    with torch.no_grad():
        start = time.perf_counter()
        extract_features(model, dataset, batch_size=64, cache=False, progress=False)
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="10x smaller problems")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    scale = 10 if args.quick else 1
    sizes = (50_000 // scale, 10_000 // scale, 768)

    ours_s, ours_pred, ours_mb = _in_fresh_process(_knn_ours, sizes)
    sk_s, sk_pred, sk_mb = _in_fresh_process(_knn_sklearn, sizes)
    agree = float(np.mean(ours_pred == sk_pred))
    fd_ours, fd_ref, fd_value, fd_reference = _bench_frechet(10_000 // scale, 2048)
    throughput = _bench_features(512 // scale)

    print(f"torch {torch.__version__}, {args.threads} threads")
    print("| benchmark | ours | reference | speed-up (reference / ours) | notes |")
    print("|---|---:|---:|---:|---|")
    print(
        f"| kNN {sizes[0]}x{sizes[1]}x{sizes[2]} | {ours_s:.2f} s | {sk_s:.2f} s (sklearn brute) | "
        f"{sk_s / ours_s:.1f}x | predictions agree on {100 * agree:.2f}%; "
        f"peak RSS {ours_mb:.0f} MB vs {sk_mb:.0f} MB |"
    )
    print(
        f"| Fréchet distance {10_000 // scale}x2048 | {fd_ours:.2f} s | {fd_ref:.2f} s (scipy sqrtm) | "
        f"{fd_ref / fd_ours:.1f}x | values {fd_value:.6f} vs {fd_reference:.6f} |"
    )
    print(f"| features, ViT-S/8 decayed MAE, 64 px | {throughput:.1f} images/s | | | batch 64 |")


if __name__ == "__main__":
    main()
