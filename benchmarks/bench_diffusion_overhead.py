"""Training-step throughput of the decayed diffusers models against their upstream classes, as ratios.

Forward + backward samples/s of a small DDPM-style UNet (``UNet2DDecayModel`` vs ``UNet2DModel``) and a small
DiT (``DiTDecayTransformer2DModel`` vs ``DiTTransformer2DModel``) at the same config and weights, the steps of
each family's variants interleaved round by round so that drifts of the machine hit every variant alike; the
median of the per-round ratios is printed. ``decay only`` is the pure cost of the fused
``torch.add(branch, x, alpha=a)`` (for the UNet, plus the decayed units' own forward); ``+ long skips`` adds
the DiT's U-ViT skip projections. Each round times ``--repeats`` back-to-back steps per variant and keeps the
fastest, which filters out load spikes from other processes on a shared machine.

    python benchmarks/bench_diffusion_overhead.py              # a few minutes on 2 CPU threads
    python benchmarks/bench_diffusion_overhead.py --rounds 8   # quick look
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from diffusers import DiTTransformer2DModel, UNet2DModel

from hf_resdecay import DiTDecayTransformer2DModel, UNet2DDecayModel

UNET = dict(
    sample_size=32,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=32,
)
"""DDPM-CIFAR-like layout at a third of the width: 32x32 RGB, attention at 16x16 and in the mid block."""

DIT = dict(
    num_attention_heads=6,
    attention_head_dim=32,
    in_channels=4,
    out_channels=8,
    num_layers=12,
    sample_size=16,
    patch_size=2,
)
"""DiT-S-like depth (12 blocks) at half width (192) on 16x16x4 latents in 2x2 patches (64 tokens)."""


Loss = Callable[[torch.nn.Module], torch.Tensor]


def _step_seconds(model: torch.nn.Module, loss: Loss) -> float:
    """Wall time of one forward + backward pass."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss(model).backward()
    return time.perf_counter() - start


def _measure(variants: dict, loss: Loss, rounds: int, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Per-variant step times (best of ``repeats`` back-to-back steps), variants interleaved in each round."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(warmup + rounds):
        for name, model in variants.items():
            seconds = min(_step_seconds(model, loss) for _ in range(repeats))
            if round_index >= warmup:
                times[name].append(seconds)
    return times


def _print_table(title: str, times: dict[str, list[float]], batch_size: int) -> None:
    reference = next(iter(times.values()))
    print(title)
    print(f"| {'variant':<26} | {'samples/s (median)':>18} | {'ratio to upstream (median)':>26} |")
    print(f"|{'-' * 28}|{'-' * 19}:|{'-' * 27}:|")
    for name, seconds in times.items():
        ratio = statistics.median(ref / own for ref, own in zip(reference, seconds, strict=True))
        throughput = batch_size / statistics.median(seconds)
        print(f"| {name:<26} | {throughput:>18.1f} | {ratio:>26.3f} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=3, help="steps per variant and round; the fastest counts (load spikes)"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    batch = args.batch_size
    print(
        f"batch {batch}, {args.threads} threads, {args.rounds} interleaved rounds of best-of-{args.repeats} "
        f"steps (+{args.warmup} warm-up rounds), torch {torch.__version__}\n"
    )

    torch.manual_seed(0)
    upstream_unet = UNet2DModel(**UNET).train()
    decayed_unet = UNet2DDecayModel(**UNET, shortcut_decay=0.2).train()
    decayed_unet.load_state_dict(upstream_unet.state_dict(), strict=True)
    unets = {"upstream UNet2DModel": upstream_unet, "decay only (0.2)": decayed_unet}
    images = torch.randn(batch, 3, UNET["sample_size"], UNET["sample_size"], generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)

    def unet_loss(model: torch.nn.Module) -> torch.Tensor:
        return model(images, timesteps).sample.square().mean()

    units = len(decayed_unet.shortcut_coefficients)
    _print_table(
        f"UNet2D {UNET['block_out_channels']} x {UNET['layers_per_block']} layers ({units} residual units), "
        f"{UNET['sample_size']}px",
        _measure(unets, unet_loss, args.rounds, args.warmup, args.repeats),
        batch,
    )

    torch.manual_seed(0)
    upstream_dit = DiTTransformer2DModel(**DIT).train()
    decay_only = DiTDecayTransformer2DModel(**DIT, shortcut_decay=0.2, long_skip_connections=False).train()
    decay_only.load_state_dict(upstream_dit.state_dict(), strict=True)
    full = DiTDecayTransformer2DModel(**DIT, shortcut_decay=0.2).train()
    full.load_state_dict(upstream_dit.state_dict(), strict=False)
    dits = {"upstream DiT": upstream_dit, "decay only (0.2)": decay_only, "decay + long skips (0.2)": full}
    size = DIT["sample_size"]
    latents = torch.randn(batch, DIT["in_channels"], size, size, generator=generator)
    labels = torch.randint(0, 1000, (batch,), generator=generator)

    def dit_loss(model: torch.nn.Module) -> torch.Tensor:
        torch.manual_seed(0)  # the same class-label dropout for every variant
        return model(latents, timestep=timesteps, class_labels=labels).sample.square().mean()

    width = DIT["num_attention_heads"] * DIT["attention_head_dim"]
    _print_table(
        f"DiT {DIT['num_layers']} blocks, width {width}, "
        f"{(DIT['sample_size'] // DIT['patch_size']) ** 2} tokens",
        _measure(dits, dit_loss, args.rounds, args.warmup, args.repeats),
        batch,
    )


if __name__ == "__main__":
    main()
