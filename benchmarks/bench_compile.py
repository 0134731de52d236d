"""Training-step throughput of the decayed MAE, eager against ``torch.compile``, measured in one run.

One step is what ``training_scripts/train_mae.py`` does per batch: forward with the masked reconstruction
loss, backward, AdamW step. The model is the training script's default CPU configuration (6 blocks of
width 192 on 28 px images in 4 px patches, decoder of 4 blocks of width 128, batch 128). The eager and the
compiled model start from the same weights; after warm-up (which includes compilation) their steps
alternate round by round, so drifts of a shared machine hit both alike, and the median of the per-round
ratios is printed with samples/s of each.

If the requested backend cannot compile here (inductor needs a C++ compiler), the script says so and
measures the next backend that works (``aot_eager``, then ``eager``). ``--profile`` adds the operators
that take the most time in one step of each variant.

    python benchmarks/bench_compile.py            # a few minutes on 2 CPU threads, compilation included
    python benchmarks/bench_compile.py --rounds 5 --warmup 2 --batch-size 32      # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from hf_resdecay import ViTMAEDecayConfig, ViTMAEDecayForPreTraining

TRAIN_MAE_DEFAULT = dict(
    image_size=28,
    patch_size=4,
    num_channels=3,
    hidden_size=192,
    num_hidden_layers=6,
    num_attention_heads=3,
    intermediate_size=768,
    decoder_hidden_size=128,
    decoder_num_hidden_layers=4,
    decoder_num_attention_heads=4,
    decoder_intermediate_size=512,
    mask_ratio=0.75,
    norm_pix_loss=True,
    shortcut_decay=0.3,
)
"""``train_mae.py``'s default model on CPU, with the released recipe's defaults for everything else."""

FALLBACK_BACKENDS = ("inductor", "aot_eager", "eager")
"""Backends tried in this order after the requested one fails to compile."""


def make_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, pixel_values: torch.Tensor
) -> Callable[[], float]:
    """A closure running one training step and returning its wall time in seconds."""

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(pixel_values).loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def compile_first_working(
    model: torch.nn.Module, backends: list[str], pixel_values: torch.Tensor
) -> tuple[torch.nn.Module, str, list[str]]:
    """``torch.compile(model)`` with the first backend whose first forward and backward pass succeed."""
    failures = []
    for backend in backends:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend)
        try:
            compiled(pixel_values).loss.backward()
        except Exception as error:  # a missing compiler surfaces as one of several error types
            failures.append(f"{backend}: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
            continue
        model.zero_grad(set_to_none=True)
        return compiled, backend, failures
    raise RuntimeError("no torch.compile backend works here:\n" + "\n".join(failures))


def print_profile(name: str, step: Callable[[], float], rows: int) -> None:
    """The operators taking the most CPU time, self time, in one step."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"\n#### Top operators, one {name} step (self CPU time)\n")
    print("```")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    print("```")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10, help="measured rounds, one step per variant each")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured rounds after compilation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend tried first")
    parser.add_argument("--profile", action="store_true", help="print the top operators of one step of each")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = ViTMAEDecayConfig(**TRAIN_MAE_DEFAULT)
    torch.manual_seed(0)
    eager = ViTMAEDecayForPreTraining(config).train()
    base = ViTMAEDecayForPreTraining(config).train()
    base.load_state_dict(eager.state_dict())
    size = config.image_size
    pixel_values = torch.randn(args.batch_size, config.num_channels, size, size)

    backends = [args.backend, *(name for name in FALLBACK_BACKENDS if name != args.backend)]
    start = time.perf_counter()
    compiled, backend, failures = compile_first_working(base, backends, pixel_values)
    compile_seconds = time.perf_counter() - start
    for failure in failures:
        print(f"torch.compile failed here, falling back: {failure}")

    steps = {
        "eager": make_step(eager, torch.optim.AdamW(eager.parameters(), lr=1.5e-4), pixel_values),
        f"torch.compile ({backend})": make_step(
            compiled, torch.optim.AdamW(base.parameters(), lr=1.5e-4), pixel_values
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(args.warmup + args.rounds):
        order = list(steps) if round_index % 2 == 0 else list(reversed(steps))
        for name in order:
            seconds = steps[name]()
            if round_index >= args.warmup:
                times[name].append(seconds)

    eager_name, compiled_name = list(steps)
    ratios = [e / c for e, c in zip(times[eager_name], times[compiled_name], strict=True)]
    print(
        f"\nViTMAEDecayForPreTraining, train_mae.py default (28 px, patch 4, width 192, 6+4 blocks), "
        f"batch {args.batch_size}, {args.threads} threads, torch {torch.__version__}; "
        f"{args.rounds} alternating rounds after {args.warmup} warm-up; first compiled step "
        f"(compilation) {compile_seconds:.0f} s\n"
    )
    print("| variant | median step (s) | samples/s | speed-up vs eager (median of per-round ratios) |")
    print("|---|---|---|---|")
    for name in steps:
        median = statistics.median(times[name])
        speedup = "1.00x" if name == eager_name else f"{statistics.median(ratios):.2f}x"
        print(f"| {name} | {median:.3f} | {args.batch_size / median:.1f} | {speedup} |")

    if args.profile:
        for name, step in steps.items():
            print_profile(name, step, rows=12)


if __name__ == "__main__":
    main()
