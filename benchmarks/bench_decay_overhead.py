"""Training-step throughput of decayed ViTMAE against upstream ViTMAE, as ratios measured in one run.

Forward + backward samples/s at a ViT-S-like encoder on small images, with the variants' steps interleaved
round by round so that drifts of the machine hit every variant alike; the median of the per-round ratios
is printed. ``decay only`` (decay on, skips off, final LayerNorm kept) is the pure cost of the fused
``torch.add(branch, x, alpha=a)``; ``full recipe`` adds the encoder-to-decoder skips.

    python benchmarks/bench_decay_overhead.py            # about a minute on 2 CPU threads
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining

from hf_resdecay import ViTMAEDecayConfig, ViTMAEDecayForPreTraining

VIT_S = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    intermediate_size=1536,
    decoder_hidden_size=256,
    decoder_num_hidden_layers=4,
    decoder_num_attention_heads=8,
    decoder_intermediate_size=1024,
)


def _step_seconds(model: torch.nn.Module, pixel_values: torch.Tensor, noise: torch.Tensor) -> float:
    """Wall time of one forward + backward pass."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    model(pixel_values, noise=noise).loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    shape = dict(VIT_S, image_size=args.image_size, patch_size=args.patch_size)
    torch.manual_seed(0)
    upstream = ViTMAEForPreTraining(ViTMAEConfig(**shape))
    variants = {
        "upstream ViTMAE": upstream,
        "decay only (0.3)": ViTMAEDecayForPreTraining(
            ViTMAEDecayConfig(
                **shape,
                shortcut_decay=0.3,
                encoder_final_layernorm=True,
                zero_init_residual_branches=False,
                decoder_skip_connections=False,
            )
        ),
        "full recipe (0.3)": ViTMAEDecayForPreTraining(ViTMAEDecayConfig(**shape, shortcut_decay=0.3)),
    }
    variants["decay only (0.3)"].load_state_dict(upstream.state_dict())
    for model in variants.values():
        model.train()

    num_patches = (args.image_size // args.patch_size) ** 2
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    noise = torch.rand(args.batch_size, num_patches)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.warmup + args.rounds):
        for name, model in variants.items():
            seconds = _step_seconds(model, pixel_values, noise)
            if round_index >= args.warmup:
                times[name].append(seconds)

    reference = times["upstream ViTMAE"]
    print(
        f"ViT-S-like encoder ({VIT_S['num_hidden_layers']} blocks, width {VIT_S['hidden_size']}), "
        f"{args.image_size}px / patch {args.patch_size}, batch {args.batch_size}, {args.threads} threads, "
        f"{args.rounds} interleaved rounds, torch {torch.__version__}"
    )
    print(f"| {'variant':<18} | {'samples/s (median)':>18} | {'ratio to upstream (median)':>26} |")
    print(f"|{'-' * 20}|{'-' * 20}:|{'-' * 28}:|")
    for name, seconds in times.items():
        ratio = statistics.median(ref / own for ref, own in zip(reference, seconds, strict=True))
        throughput = args.batch_size / statistics.median(seconds)
        print(f"| {name:<18} | {throughput:>18.1f} | {ratio:>26.3f} |")


if __name__ == "__main__":
    main()
