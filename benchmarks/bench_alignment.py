"""Residual-Jacobian SVD cost: matrix-free on a ViT-B block, and against the dense method where it fits.

- Top-8 singular triplets of one ViT-B/16 block's full-sequence residual Jacobian (197 tokens x 768 =
  151,296 inputs and outputs; the dense Jacobian alone would take 92 GB in float32) with the matrix-free
  randomized block-Krylov SVD (``torch.func`` jvp / vjp batched with ``vmap``, 8 oversampling columns,
  2 power iterations, no Frobenius probes). Its accuracy is shown by the relative residual
  ``max_i ||J v_i - s_i u_i|| / s_i`` (``J^T U = V S`` holds exactly by construction).
- Smaller ViT blocks whose dense Jacobian fits in memory: dense (``jacfwd`` + full float64 SVD) against the
  matrix-free method, the time ratio and the largest relative error of the top-8 singular values.
- ``--report small|vit-b``: a whole 12-block, 16-sample :func:`hf_resdecay.alignment.analyze` report (top-8,
  16 Frobenius probes, cross-depth products for every sample) of a ViT of width 192 on 32x32 images
  (``small``, 17 tokens) or of ViT-B/16 (``vit-b``: hours on a CPU, meant for a GPU with ``--device cuda``).

Random weights (transformers' ``ViTModel`` initialisation), one image of Gaussian pixels per sample, each
measurement in a fresh process so that its extra peak resident memory can be reported.

    python benchmarks/bench_alignment.py                    # ViT-B block and two dense comparisons
    python benchmarks/bench_alignment.py --quick            # one smaller dense comparison, same ViT-B block
    python benchmarks/bench_alignment.py --report small     # plus a small 12-block 16-sample report

On a machine whose cores are busy with other work, use ``--threads 1``: oversubscribed OpenMP threads make
small products hundreds of times slower.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import resource
import time
from dataclasses import dataclass

VIT_B = dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, image_size=224, patch_size=16)
"""ViT-B/16 at 224 px: 197 tokens of width 768."""
VIT_TI = dict(hidden_size=192, num_attention_heads=3, intermediate_size=768, patch_size=8)
"""ViT-Ti widths with 8x8 patches; the image size sets the token count."""


@dataclass
class Measurement:
    seconds: float
    extra_peak_mb: float
    singular_values: list[float]
    residual: float | None = None


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vit(config: dict, layers: int, threads: int, seed: int = 0):
    import torch
    from transformers import ViTConfig, ViTModel

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return ViTModel(ViTConfig(**config, num_hidden_layers=layers), add_pooling_layer=False).eval()


def _images(config: dict, count: int):
    import torch

    size = config["image_size"]
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


def _block_svd(config: dict, method: str, k: int, power_iters: int, threads: int, device: str) -> Measurement:
    """One block's top-``k`` triplets at one sample, in this (fresh) process."""
    import torch

    from hf_resdecay.alignment import (
        analysis_attention,
        capture_block_inputs,
        discover_residual_blocks,
        jacobian_matvec,
        residual_jacobian_svd,
    )

    model = _vit(config, 1, threads).to(device)
    blocks = discover_residual_blocks(model).blocks
    capture = capture_block_inputs(model, blocks, _images(config, 1).to(device))[0]
    h, args, kwargs = capture.sample(0)
    fn = capture.block.branch(h, args, kwargs)
    generator = torch.Generator().manual_seed(0)
    with analysis_attention(model):
        fn(h)  # warm-up
        baseline = _rss_mb()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        svd = residual_jacobian_svd(fn, h, k, method=method, power_iters=power_iters, generator=generator)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        extra = _peak_mb() - baseline
        residual = None
        if method == "randomized":
            jv = jacobian_matvec(fn, h, svd.right.T).double()
            s = svd.singular_values.double()
            residual = float(((jv - s[:, None] * svd.left.T.double()).norm(dim=1) / s).max())
    return Measurement(seconds, extra, svd.singular_values.double().cpu().tolist(), residual)


def _report(
    config: dict, samples: int, k: int, power_iters: int, threads: int, device: str
) -> tuple[float, int]:
    """Seconds for a 12-block ``analyze`` report over ``samples`` samples, and the block count."""
    from hf_resdecay.alignment import analyze

    model = _vit(config, 12, threads).to(device)
    pixels = _images(config, samples).to(device)
    start = time.perf_counter()
    report = analyze(model, pixels, top_k=k, method="randomized", power_iters=power_iters, progress=True)
    return time.perf_counter() - start, report.num_blocks


def _fresh(function, *args):
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def _dims(config: dict) -> tuple[int, int]:
    tokens = (config["image_size"] // config["patch_size"]) ** 2 + 1
    return tokens, config["hidden_size"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one small dense comparison instead of two")
    parser.add_argument(
        "--report", choices=("small", "vit-b"), default=None, help="also time a 12-block, 16-sample report"
    )
    parser.add_argument("--power-iters", type=int, default=2, help="of the matrix-free method (default 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import torch

    from hf_resdecay.alignment import dense_jacobian_bytes

    k = args.top_k
    q = args.power_iters
    print(
        f"torch {torch.__version__}, {args.threads} threads, device {args.device}, top-{k}, {q} power iters"
    )
    print("| benchmark | matrix-free | dense | dense / matrix-free | notes |")
    print("|---|---:|---:|---:|---|")

    tokens, width = _dims(VIT_B)
    n = tokens * width
    ours = _fresh(_block_svd, VIT_B, "randomized", k, q, args.threads, args.device)
    print(
        f"| ViT-B/16 block, {tokens} x {width} = {n:,} | "
        f"{ours.seconds:.1f} s, +{ours.extra_peak_mb:.0f} MB | "
        f"does not fit ({dense_jacobian_bytes(n, n) / 1e9:.0f} GB for J in float32) | - | "
        f"s1 {ours.singular_values[0]:.3f}, s{k} {ours.singular_values[-1]:.3f}; "
        f"relative residual of J v = s u: {ours.residual:.2e} |"
    )

    sizes = [24] if args.quick else [32, 40]  # 8x8 patches: 10, 17 and 26 tokens
    for image_size in sizes:
        config = {**VIT_TI, "image_size": image_size}
        tokens, width = _dims(config)
        n = tokens * width
        fast = _fresh(_block_svd, config, "randomized", k, q, args.threads, args.device)
        dense = _fresh(_block_svd, config, "dense", k, q, args.threads, args.device)
        error = max(abs(a - b) / b for a, b in zip(fast.singular_values, dense.singular_values, strict=True))
        print(
            f"| ViT-Ti block (192 wide), {tokens} x {width} = {n:,} | {fast.seconds:.2f} s, "
            f"+{fast.extra_peak_mb:.0f} MB | {dense.seconds:.2f} s, +{dense.extra_peak_mb:.0f} MB | "
            f"{dense.seconds / fast.seconds:.1f}x | top-{k} singular values within {100 * error:.2f}% of "
            f"dense; residual {fast.residual:.2e} |"
        )

    if args.report:
        config = {**VIT_TI, "image_size": 32} if args.report == "small" else VIT_B
        tokens, width = _dims(config)
        seconds, blocks = _fresh(_report, config, 16, k, q, args.threads, args.device)
        print(
            f"| whole report: {blocks} blocks x 16 samples, {tokens} x {width} tokens | "
            f"{seconds:.1f} s | - | - | "
            f"top-{k}, {q} power iterations, 16 Frobenius probes, cross-depth products for all samples |"
        )


if __name__ == "__main__":
    main()
