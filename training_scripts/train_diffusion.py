#!/usr/bin/env python
"""Train a pixel-space diffusion model with decayed shortcuts (UNet2D or DiT) with Accelerate.

    accelerate launch training_scripts/train_diffusion.py --model unet --output_dir runs/unet-decay
    accelerate launch training_scripts/train_diffusion.py --model dit --objective flow --output_dir runs/dit

Objectives: ``ddpm`` (epsilon prediction) or ``flow`` (linear path, velocity prediction: the paper's SiT
setting). A DiT is class-conditional when the data has labels. Weights are averaged with diffusers'
``EMAModel``; every ``--sample_every`` epochs a grid of EMA samples is written to ``output_dir/samples``.
Checkpoints (``--checkpointing_steps``) resume exactly, EMA included. The final model is saved with its
scheduler (for the UNet as a complete ``DDPMPipeline``), with a model card, and optionally pushed to the Hub.
A NaN or inf loss stops every process at once (exit status 1, naming the step and the lr); nothing non-finite
is saved.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate.utils import set_seed
from huggingface_hub import ModelCard, ModelCardData
from tqdm.auto import tqdm
from transformers import HfArgumentParser, get_cosine_schedule_with_warmup

import hf_resdecay
from hf_resdecay import alpha_eff
from hf_resdecay.atomic import atomic_write, write_json_atomic
from hf_resdecay.data import EMBEDDED_DATASET
from hf_resdecay.hub import results_to_eval_results, save_card_atomic
from hf_resdecay.pipelines import make_pipeline_portable
from hf_resdecay.sampling import OBJECTIVES, diffusion_loss, image_grid, make_scheduler, sample_images
from hf_resdecay.training import (
    CommonTrainingArguments,
    DataArguments,
    MetricsLog,
    OutputLocked,
    TrainingLoop,
    enable_gradient_checkpointing,
    exit_interrupted,
    fail,
    given_flags,
    hold_output_lock,
    input_dtype,
    load_splits,
    make_accelerator,
    make_ema,
    parameter_groups,
    plan_schedule,
    publish_directory,
    push_final_model,
    resume_state,
    run_settings,
    unsharded_model,
)
from hf_resdecay.training.images import ImageTransform, training_loader

SCRIPT = Path(__file__).name
CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "diffusion_decay.md"
FAMILIES = {"unet": ("UNet2DDecayModel", "unet"), "dit": ("DiTDecayTransformer2DModel", "transformer")}
LR_FLAG = "--learning_rate"


@dataclass
class ModelArguments:
    """The denoiser: a decayed UNet2D or DiT, from a checkpoint or built from these fields."""

    model: str = field(default="unet", metadata={"help": "unet | dit"})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "folder or Hub id (with subfolder unet/ or transformer/) to start from"},
    )
    shortcut_decay: float = field(default=0.2, metadata={"help": "1 - alpha_min in [0, 1); paper: 0.2"})
    shortcut_schedule: str = field(default="linear", metadata={"help": "linear | cosine | constant"})
    long_skip_connections: bool = field(default=True, metadata={"help": "DiT only: U-ViT long skips"})
    image_size: int = 28
    num_channels: int | None = field(default=None, metadata={"help": "default: from the first image"})
    block_out_channels: str = field(default="32,64", metadata={"help": "UNet widths per resolution"})
    layers_per_block: int = 1
    num_layers: int = field(default=6, metadata={"help": "DiT blocks"})
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    patch_size: int = field(default=4, metadata={"help": "DiT patch size"})


@dataclass
class TrainingArguments(CommonTrainingArguments):
    """The shared training flags plus the diffusion objective, EMA and sampling."""

    objective: str = field(default="ddpm", metadata={"help": "ddpm (epsilon) | flow (velocity, SiT)"})
    num_train_timesteps: int = 1000
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    warmup_epochs: float = 0.2
    use_ema: bool = True
    ema_decay: float = 0.999
    sample_every: int = field(default=1, metadata={"help": "EMA sample grid every N epochs (0: at the end)"})
    num_samples: int = field(default=16, metadata={"help": "images in each sample grid"})
    num_inference_steps: int = 50


def build_model(model_args: ModelArguments, channels: int, num_classes: int | None, given: set[str]):
    """A decayed UNet2D or DiT from a checkpoint (only the flags given change it) or from the flags."""
    class_name, subfolder = FAMILIES[model_args.model]
    model_class = getattr(hf_resdecay, class_name)
    decay = {"shortcut_decay": model_args.shortcut_decay, "shortcut_schedule": model_args.shortcut_schedule}
    if model_args.model == "dit":
        decay["long_skip_connections"] = model_args.long_skip_connections
    if model_args.model_name_or_path:
        source = Path(model_args.model_name_or_path)
        kwargs = {key: value for key, value in decay.items() if key in given}
        if not (source / "config.json").exists():
            kwargs["subfolder"] = subfolder
        return model_class.from_pretrained(model_args.model_name_or_path, **kwargs)
    if model_args.model == "unet":
        widths = tuple(int(width) for width in model_args.block_out_channels.split(","))
        down = ("DownBlock2D",) + ("AttnDownBlock2D",) * (len(widths) - 1)
        up = ("AttnUpBlock2D",) * (len(widths) - 1) + ("UpBlock2D",)
        return model_class(
            sample_size=model_args.image_size,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=widths,
            layers_per_block=model_args.layers_per_block,
            down_block_types=down,
            up_block_types=up,
            norm_num_groups=min(8, widths[0]),
            **decay,
        )
    return model_class(
        sample_size=model_args.image_size,
        in_channels=channels,
        num_layers=model_args.num_layers,
        num_attention_heads=model_args.num_attention_heads,
        attention_head_dim=model_args.attention_head_dim,
        patch_size=model_args.patch_size,
        num_embeds_ada_norm=num_classes or 1,
        norm_eps=1e-6,  # SiT's LayerNorms and timestep frequencies (diffusers' DiT: 1e-5 and shift 1)
        timestep_freq_shift=0,
        **decay,
    )


def check_arguments(model_args: ModelArguments, args: TrainingArguments) -> None:
    """Raise ``ValueError`` for the first bad flag, naming it and what is allowed."""
    args.check()
    if model_args.model not in FAMILIES:
        raise ValueError(f"--model must be one of {', '.join(FAMILIES)}; got {model_args.model!r}")
    if args.objective not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}; got {args.objective!r}")
    if not 0.0 <= model_args.shortcut_decay < 1.0:
        raise ValueError(f"--shortcut_decay must be in [0, 1); got {model_args.shortcut_decay}")
    if model_args.model == "dit" and model_args.image_size % model_args.patch_size:
        raise ValueError(
            f"--image_size {model_args.image_size} must be divisible by --patch_size {model_args.patch_size}"
        )
    if model_args.num_channels not in (None, 1, 3):
        raise ValueError(f"--num_channels must be 1 or 3; got {model_args.num_channels}")
    if not 0.0 < args.ema_decay < 1.0:
        raise ValueError(f"--ema_decay must be in (0, 1); got {args.ema_decay}")
    for name in ("num_samples", "num_inference_steps", "num_train_timesteps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1; got {getattr(args, name)}")


@contextlib.contextmanager
def ema_weights(ema, model) -> Iterator[None]:
    """Run a block with the EMA average in ``model``'s parameters (every process: its own slices), then put
    the trained weights back; without EMA, the weights as they are."""
    if ema is None:
        yield
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield
    finally:
        ema.restore(model.parameters())


def sample_grid(model, scheduler, args, num_classes: int | None, path: Path) -> None:
    """Write a PNG grid of samples from ``model`` (class ``i % C`` for image ``i`` of a DiT)."""
    labels = torch.arange(args.num_samples) % num_classes if num_classes else None
    generator = torch.Generator().manual_seed(args.seed)
    was_training = model.training
    images = sample_images(
        model, scheduler, args.num_samples, args.num_inference_steps, labels, generator=generator
    )
    model.train(was_training)
    with atomic_write(path, "wb") as handle:
        image_grid(images, rows=int(math.sqrt(args.num_samples)) or 1).save(handle, format="PNG")


def render_card(model, model_args, args, repo_id, dataset_name, train_size, channels, num_classes, info):
    alphas = model.shortcut_coefficients
    class_name, subfolder = FAMILIES[model_args.model]
    card_data = ModelCardData(
        library_name="diffusers",
        tags=[
            "decayed-shortcuts",
            "hf_resdecay",
            f"{model_args.model}-decay",
            "unconditional-image-generation",
        ],
        datasets=[dataset_name],
        model_name=repo_id.split("/")[-1],
        eval_results=results_to_eval_results(info["results"], dataset_name, "train") or None,
    )
    objective_text = (
        "DDPM, epsilon prediction"
        if args.objective == "ddpm"
        else "flow matching, linear path, velocity prediction (SiT)"
    )
    results = info["results"]
    results_text = (
        f"FID {results['summary']['fid']:.2f} ({results['fid']['generated']} samples)."
        if "fid" in results.get("summary", {})
        else "No FID computed in this run: `hf-resdecay evaluate` scores the saved pipeline."
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        family="UNet2D" if model_args.model == "unet" else "DiT",
        class_name=class_name,
        subfolder=subfolder,
        scheduler_class=type(info["scheduler"]).__name__,
        pipeline=model_args.model == "unet",
        dataset_name=dataset_name,
        shortcut_decay=model.config.shortcut_decay,
        shortcut_schedule=model.config.shortcut_schedule,
        num_units=len(alphas),
        alpha_first=f"{alphas[0]:.3f}",
        alpha_last=f"{alphas[-1]:.3f}",
        alpha_eff=f"{alpha_eff(alphas):.3g}",
        long_skips=getattr(model.config, "long_skip_connections", "n/a (the UNet has its own)"),
        train_samples=train_size,
        image_size=model_args.image_size,
        channels=channels,
        objective_text=objective_text,
        conditioning=f"{num_classes} classes" if num_classes else "none",
        steps=info["steps"],
        epochs=info["epochs"],
        global_batch_size=info["global_batch"],
        learning_rate=f"{args.learning_rate:.3g}",
        weight_decay=args.weight_decay,
        warmup_steps=info["warmup_steps"],
        ema_text=f"decay {args.ema_decay} (the saved weights)" if args.use_ema else "off",
        final_loss=f"{results['final_loss']:.4f}",
        results_text=results_text,
    )


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, args = parser.parse_args_into_dataclasses(args=argv)
    try:
        check_arguments(model_args, args)
        data_args.check()
    except ValueError as error:
        fail(str(error))
    accelerator = make_accelerator(args)
    try:
        with accelerator.main_process_first():  # one process downloads and caches, the others read
            train, _, image_column, label_column = load_splits(data_args)
    except ValueError as error:
        fail(str(error))
    output_dir = Path(args.output_dir)
    checkpoints = output_dir / "checkpoints"
    first = next(iter(train))[image_column]
    channels = model_args.num_channels or (1 if first.mode in ("L", "1", "I", "F") else 3)
    class_names = getattr(train.features.get(label_column), "names", None) if label_column else None
    num_classes = len(class_names) if class_names and model_args.model == "dit" else None
    set_seed(args.seed)  # model initialisation
    try:
        model = build_model(model_args, channels, num_classes, given_flags(parser, argv))
    except (ValueError, TypeError, OSError) as error:
        fail(" ".join(str(error).split()))
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    scheduler_kind = make_scheduler(args.objective, args.num_train_timesteps)
    transform = ImageTransform(model.config.sample_size, channels, "center", hflip=data_args.hflip)
    labels = label_column if num_classes else None
    try:  # a few images are decoded first: a broken dataset fails here
        loader, data = training_loader(accelerator, train, image_column, transform, args, data_args, labels)
    except ValueError as error:
        fail(str(error))
    optimizer = torch.optim.AdamW(
        parameter_groups(model, args.weight_decay), lr=args.learning_rate, betas=(0.9, 0.999)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = make_ema(model.parameters(), args.ema_decay, accelerator.device) if args.use_ema else None
    accumulation = accelerator.gradient_accumulation_steps  # the launcher's config may have set it
    global_batch = args.per_device_train_batch_size * accumulation * accelerator.num_processes
    try:
        plan = plan_schedule(args, train, loader, accumulation, global_batch, data_args.train_split)
    except ValueError as error:
        fail(str(error))
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_steps)
    states = {"lr_schedule": lr_schedule} | ({"ema": ema} if ema is not None else {})  # never pickled
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        try:  # one run per output folder, for the whole run
            hold_output_lock(output_dir)
        except OutputLocked as error:
            fail(f"{error}: wait for it to end, or choose another --output_dir")
    try:
        start_step, position = resume_state(accelerator, checkpoints, args.resume_from_checkpoint, states)
    except ValueError as error:
        fail(str(error))
    if args.report_to != "none":
        accelerator.init_trackers(
            "train_diffusion", config={"model": model_args.model, "lr": args.learning_rate}
        )
    log = MetricsLog(accelerator, output_dir / "logs" / "metrics.jsonl", trackers=args.report_to != "none")
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    run = run_settings(accelerator, args.learning_rate, global_batch, model)
    images = f"{len(train)} training images" if not data_args.streaming else "streamed training images"
    accelerator.print(
        f"{images} ({channels} channel(s), {num_classes or 'no'} classes), {plan.total_steps} steps "
        f"({plan.epochs or '?'} epochs), global batch {global_batch}; {model_args.model} with shortcut_decay="
        f"{unwrapped.config.shortcut_decay}, alpha_eff={alpha_eff(unwrapped.shortcut_coefficients):.3g}; "
        f"objective {args.objective}; run {run}"
    )

    dtype = input_dtype(model)

    def train_step(batch: dict, generator: torch.Generator, log_now: bool) -> tuple[torch.Tensor, dict]:
        clean = (batch["pixel_values"].float() / 127.5 - 1).to(dtype)  # uint8 to [-1, 1]
        loss = diffusion_loss(model, scheduler_kind, clean, batch.get("labels"), generator)
        return loss, {}

    def saved_weights() -> list[torch.Tensor]:
        """What a checkpoint or the final model holds: the weights and, with EMA, their average."""
        return [*model.parameters(), *(ema.shadow_params if ema is not None else [])]

    def end_of_epoch(epoch: int, step: int) -> None:
        if not (args.sample_every and epoch % args.sample_every == 0):
            return
        grid = output_dir / "samples" / f"epoch_{epoch:04d}.png"
        with ema_weights(ema, model):
            averaged = unsharded_model(accelerator, model)  # every process: gathers sharded weights
            if accelerator.is_main_process:
                scheduler = make_scheduler(args.objective, args.num_train_timesteps)
                sample_grid(averaged, scheduler, args, num_classes, grid)
                tqdm.write(f"epoch {epoch}: samples in {grid}")

    loop = TrainingLoop(
        accelerator, model, optimizer, lr_schedule, loader, data, args, plan.total_steps, checkpoints, log,
        LR_FLAG, args.learning_rate, SCRIPT, train_step, streaming=data_args.streaming,
        end_of_epoch=end_of_epoch, saved_weights=saved_weights,
        after_step=(lambda: ema.step(model.parameters())) if ema is not None else None, states=states,
    )  # fmt: skip
    done = loop.run(start_step, position, None if data_args.streaming else plan.steps_per_epoch)
    epochs = plan.epochs or done.epochs

    if ema is not None:
        ema.copy_to(model.parameters())  # the saved model is the EMA model (every process: its own slice)
    final = unsharded_model(accelerator, model)  # every process: gathers sharded weights
    if accelerator.is_main_process:
        results = {"final_loss": done.last_loss, "steps": done.step, "epochs": epochs, "summary": {}}
        results["run"] = run
        if data_args.skip_bad_images:
            results["skipped_images"] = {"count": len(done.bad_images), "files": done.bad_images}
        sampler = make_scheduler(args.objective, args.num_train_timesteps)
        staging = output_dir / ".final.partial"
        shutil.rmtree(staging, ignore_errors=True)
        sample_grid(final, sampler, args, num_classes, staging / "samples" / "final.png")
        class_name, subfolder = FAMILIES[model_args.model]
        if model_args.model == "unet":
            from diffusers import DDPMPipeline

            DDPMPipeline(unet=final, scheduler=sampler).save_pretrained(staging)
            make_pipeline_portable(staging)
        else:
            final.save_pretrained(staging / subfolder)
            sampler.save_pretrained(staging / "scheduler")
        results["model"] = {
            "class": class_name,
            "shortcut_coefficients": final.shortcut_coefficients,
            "alpha_eff": alpha_eff(final.shortcut_coefficients),
        }
        repo_id = args.hub_model_id or output_dir.name
        dataset_name = data_args.dataset_name or data_args.train_dir or EMBEDDED_DATASET
        info = SimpleNamespace(
            results=results, scheduler=sampler, steps=done.step, epochs=epochs, global_batch=global_batch,
            warmup_steps=plan.warmup_steps,
        )  # fmt: skip
        train_size = len(train) if not data_args.streaming else "streamed"
        card = render_card(
            final, model_args, args, repo_id, dataset_name, train_size, channels, num_classes, vars(info)
        )
        save_card_atomic(card, staging / "README.md")
        marker = "model_index.json" if model_args.model == "unet" else f"{subfolder}/config.json"
        write_json_atomic(results, staging / "results.json")
        publish_directory(staging, output_dir, marker=marker)  # model, card and results in one atomic step
        print(f"final training loss {done.last_loss:.4f}; model saved to {output_dir}", flush=True)
    accelerator.wait_for_everyone()
    if args.report_to != "none":
        accelerator.end_training()
    if args.push_to_hub and accelerator.is_main_process:
        push_final_model(output_dir, args, SCRIPT)


if __name__ == "__main__":
    print(f"hf_resdecay {hf_resdecay.__version__}, started {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    try:
        main()
    except KeyboardInterrupt:
        exit_interrupted()
