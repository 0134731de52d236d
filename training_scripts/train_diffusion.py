#!/usr/bin/env python
"""Train a diffusion model with decayed shortcuts (UNet2D or DiT; pixels, or a VAE's latents) with Accelerate.

    accelerate launch training_scripts/train_diffusion.py --model unet --output_dir runs/unet-decay
    accelerate launch training_scripts/train_diffusion.py --model dit --objective flow --output_dir runs/dit
    accelerate launch training_scripts/train_diffusion.py --model dit --objective flow --image_size 256 \
        --vae stabilityai/sd-vae-ft-ema --class_conditional --cache_latents --output_dir runs/sit

Objectives: ``ddpm`` (epsilon prediction) or ``flow`` (linear path, velocity prediction: the paper's SiT
setting). With ``--vae`` the DiT learns the VAE's scaled latents (encoded on the device, or once with
``--cache_latents``; :mod:`hf_resdecay.training.latents`). A DiT is class-conditional when the data has
labels (``--class_conditional``), with ``--label_dropout`` for classifier-free guidance. Weights are averaged
with diffusers' ``EMAModel``; every ``--sample_every`` epochs a grid of EMA samples is written to
``output_dir/samples``. Checkpoints (every ``--checkpointing_steps``, 500 by default) resume exactly, EMA
included. ``--recipe FILE.yaml`` sets flags from a file (``training_scripts/recipes/``: the paper's SiT), the
command line winning; model flags not given keep the config (a checkpoint's, else the default recipe's). The
final model is saved as a pipeline (a ``DDPMPipeline`` for the UNet, a ``DiTDecayPipeline`` with
``--guidance_scale`` as its default for the DiT), with a model card, and optionally pushed to the Hub.
A NaN or inf loss stops every process at once (exit status 1, naming the step and the lr); nothing non-finite
is saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch
from accelerate.utils import set_seed
from huggingface_hub import ModelCard, ModelCardData
from transformers import get_cosine_schedule_with_warmup

import hf_resdecay
from hf_resdecay import alpha_eff
from hf_resdecay.atomic import atomic_write, write_json_atomic
from hf_resdecay.data import EMBEDDED_DATASET
from hf_resdecay.hub import GENERATION_TASK_TYPE, card_model_id, results_to_eval_results, save_card_atomic
from hf_resdecay.pipelines import DiTDecayPipeline, make_pipeline_portable
from hf_resdecay.sampling import (
    OBJECTIVES,
    diffusion_loss,
    image_grid,
    is_conditional,
    make_scheduler,
    sample_images,
)
from hf_resdecay.training import (
    CommonTrainingArguments,
    DataArguments,
    MetricsLog,
    OutputLocked,
    ScriptArgumentParser,
    ShortcutSchedule,
    TrainingLoop,
    announce,
    check_choices,
    enable_gradient_checkpointing,
    exit_interrupted,
    fail,
    given_fields,
    hold_output_lock,
    input_dtype,
    load_splits,
    make_accelerator,
    make_ema,
    parameter_groups,
    parse_config_overrides,
    plan_schedule,
    publish_directory,
    push_final_model,
    resume_state,
    run_settings,
    unsharded_model,
)
from hf_resdecay.training.images import ImageTransform, training_loader
from hf_resdecay.training.latents import (
    CachedLatents,
    cache_latents,
    encode_moments,
    latent_geometry,
    latent_loader,
    latents_from_moments,
    load_vae,
)

SCRIPT = Path(__file__).name
CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "diffusion_decay.md"
FAMILIES = {"unet": ("UNet2DDecayModel", "unet"), "dit": ("DiTDecayTransformer2DModel", "transformer")}
LR_FLAG = "--learning_rate"
DEFAULT_RECIPE = Path(__file__).resolve().parent / "recipes" / "diffusion_cpu_default.yaml"
"""The models a bare command builds (small UNet and DiT at 28 px): the one place their sizes are written."""
Objective = Literal[OBJECTIVES]


@dataclass
class ModelArguments:
    """The denoiser: a decayed UNet2D or DiT, from a checkpoint or built from these fields.

    Every config flag defaults to None, "keep the config": the checkpoint's value when starting from one,
    else the default recipe's (``recipes/diffusion_cpu_default.yaml``, used when no ``--recipe`` is given),
    else the model class's default. Flags of the other family are ignored.
    """

    model: Literal["unet", "dit"] = field(default="unet", metadata={"help": "the denoiser family"})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "folder or Hub id (with subfolder unet/ or transformer/) to start from"},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "other config fields of the model class, e.g. 'dropout=0.1,norm_num_groups=8'"},
    )
    shortcut_decay: float | None = field(
        default=None, metadata={"help": "1 - alpha_min in [0, 1); paper and config default: 0.2"}
    )
    shortcut_schedule: ShortcutSchedule | None = None
    long_skip_connections: bool | None = field(default=None, metadata={"help": "DiT only: U-ViT long skips"})
    image_size: int | None = field(default=None, metadata={"help": "the model's sample_size"})
    num_channels: int | None = field(default=None, metadata={"help": "default: from the first image"})
    block_out_channels: str | None = field(default=None, metadata={"help": "UNet widths, e.g. 32,64"})
    layers_per_block: int | None = field(default=None, metadata={"help": "UNet only"})
    num_layers: int | None = field(default=None, metadata={"help": "DiT blocks"})
    num_attention_heads: int | None = field(default=None, metadata={"help": "DiT only"})
    attention_head_dim: int | None = field(default=None, metadata={"help": "DiT only"})
    patch_size: int | None = field(default=None, metadata={"help": "DiT patch size"})


@dataclass
class TrainingArguments(CommonTrainingArguments):
    """The shared training flags plus the diffusion objective, EMA and sampling."""

    objective: Objective = field(default="ddpm", metadata={"help": "ddpm (epsilon) or flow (velocity, SiT)"})
    num_train_timesteps: int = 1000
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    warmup_epochs: float = 0.2
    use_ema: bool = True
    ema_decay: float = 0.999
    sample_every: int = field(default=1, metadata={"help": "EMA sample grid every N epochs (0: at the end)"})
    num_samples: int = field(default=16, metadata={"help": "images in each sample grid"})
    num_inference_steps: int = 50
    vae: str | None = field(
        default=None,
        metadata={
            "help": "AutoencoderKL Hub id or folder: train the DiT on its latents (SiT: sd-vae-ft-ema)"
        },
    )
    class_conditional: bool | None = field(
        default=None, metadata={"help": "DiT on the data's class labels; default: when the data has them"}
    )
    label_dropout: float = field(
        default=0.1, metadata={"help": "fraction of labels replaced by the null class (CFG; SiT: 0.1)"}
    )
    guidance_scale: float = field(
        default=1.0, metadata={"help": "classifier-free guidance of sample grids and the saved pipeline"}
    )
    cache_latents: bool = field(
        default=False, metadata={"help": "with --vae: encode the training set once, cached on disk"}
    )


FAMILY_FLAGS = {
    "unet": ("block_out_channels", "layers_per_block"),
    "dit": ("long_skip_connections", "num_layers", "num_attention_heads", "attention_head_dim", "patch_size"),
}
"""The config flags each family reads besides the decay, the schedule and the image size."""


def model_settings(model_args: ModelArguments) -> dict:
    """The config fields the flags that are set (not None) give the chosen family."""
    flags = ("shortcut_decay", "shortcut_schedule", "image_size", *FAMILY_FLAGS[model_args.model])
    settings = {name: value for name, value in given_fields(model_args).items() if name in flags}
    if "image_size" in settings:
        settings["sample_size"] = settings.pop("image_size")
    if "block_out_channels" in settings:
        text = settings["block_out_channels"]
        try:
            widths = tuple(int(width) for width in text.split(","))
        except ValueError:
            message = f"--block_out_channels must be comma-separated widths, e.g. 32,64; got {text!r}"
            raise ValueError(message) from None
        settings["block_out_channels"] = widths
        settings["down_block_types"] = ("DownBlock2D",) + ("AttnDownBlock2D",) * (len(widths) - 1)
        settings["up_block_types"] = ("AttnUpBlock2D",) * (len(widths) - 1) + ("UpBlock2D",)
        settings["norm_num_groups"] = min(8, widths[0])
    return settings


def build_model(model_args: ModelArguments, channels: int, num_classes: int | None):
    """A decayed UNet2D or DiT: from a checkpoint, changed only by the flags that are set and
    ``--config_overrides``; or built from them on the model class's defaults."""
    class_name, subfolder = FAMILIES[model_args.model]
    model_class = getattr(hf_resdecay, class_name)
    settings = model_settings(model_args)
    source = model_args.model_name_or_path
    if source:
        location = {} if (Path(source) / "config.json").exists() else {"subfolder": subfolder}
        if model_args.config_overrides:
            base = {**model_class.load_config(source, **location), **settings}
            settings |= parse_config_overrides(base, model_args.config_overrides)
        return model_class.from_pretrained(source, **location, **settings)
    if model_args.model == "unet":
        if "sample_size" not in settings:
            raise ValueError("--image_size is needed to build a UNet (UNet2DModel has no default size)")
        settings |= {"in_channels": channels, "out_channels": channels}
    else:  # SiT's LayerNorms and timestep frequencies (diffusers' DiT: 1e-5 and shift 1)
        settings |= {"in_channels": channels, "num_embeds_ada_norm": num_classes or 1}
        settings |= {"norm_eps": 1e-6, "timestep_freq_shift": 0}
    if model_args.config_overrides:
        parameters = inspect.signature(model_class.__init__).parameters.values()
        defaults = {item.name: item.default for item in parameters if item.default is not item.empty}
        settings |= parse_config_overrides({**defaults, **settings}, model_args.config_overrides)
    return model_class(**settings)


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """The flags, on top of ``--recipe`` or, for a fresh model without one, the CPU default recipe."""
    parser = ScriptArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    try:
        return parser.parse(argv, default_recipe=DEFAULT_RECIPE)
    except ValueError as error:
        fail(str(error))


def check_arguments(model_args: ModelArguments, args: TrainingArguments) -> None:
    """Raise ``ValueError`` for the first bad flag, naming it and what is allowed."""
    args.check()
    check_choices(model_args)
    if model_args.shortcut_decay is not None and not 0.0 <= model_args.shortcut_decay < 1.0:
        raise ValueError(f"--shortcut_decay must be in [0, 1); got {model_args.shortcut_decay}")
    sizes = (model_args.image_size, model_args.patch_size)
    if model_args.model == "dit" and None not in sizes and model_args.image_size % model_args.patch_size:
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
    if not 0.0 <= args.label_dropout < 1.0:
        raise ValueError(f"--label_dropout must be in [0, 1); got {args.label_dropout}")
    if args.guidance_scale < 0:
        raise ValueError(f"--guidance_scale must be >= 0 (1: no guidance); got {args.guidance_scale}")
    if args.vae and model_args.model != "dit":
        raise ValueError("--vae trains a DiT on latents: add --model dit")
    if args.cache_latents and not args.vae:
        raise ValueError("--cache_latents caches VAE latents: add --vae")
    if args.class_conditional and model_args.model != "dit":
        raise ValueError("--class_conditional needs --model dit (the UNet takes no class labels)")


def autocast_dtype(accelerator) -> torch.dtype | None:
    """The autocast dtype of the run's mixed precision (None without): the VAE encodes under it."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)


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


def dit_pipeline(model, scheduler, args, vae, class_names: list[str] | None) -> DiTDecayPipeline:
    """The DiT as the pipeline the run saves: transformer, scheduler, VAE (latent runs), class names and
    ``--guidance_scale`` as its default."""
    id2label = dict(enumerate(class_names)) if class_names else None
    pipeline = DiTDecayPipeline(
        model, scheduler, vae=vae, id2label=id2label, guidance_scale=args.guidance_scale
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample_grid(model, scheduler, args, num_classes: int | None, path: Path, vae=None, names=None) -> None:
    """Write a PNG grid of samples from ``model`` (a DiT through its pipeline: class ``i % C`` for image
    ``i``, guided with ``--guidance_scale``, decoded by the VAE in latent runs)."""
    generator = torch.Generator().manual_seed(args.seed)
    was_training = model.training
    if is_conditional(model):
        pipeline = dit_pipeline(model, scheduler, args, vae, names)
        steps = args.num_inference_steps
        images = pipeline(batch_size=args.num_samples, generator=generator, num_inference_steps=steps,
                          output_type="pt").images  # fmt: skip
    else:
        images = sample_images(
            model, scheduler, args.num_samples, args.num_inference_steps, generator=generator
        )
    model.train(was_training)
    with atomic_write(path, "wb") as handle:
        image_grid(images, rows=int(math.sqrt(args.num_samples)) or 1).save(handle, format="PNG")


def render_card(model, model_args, args, repo_id, dataset_name, train_size, channels, num_classes, info):
    alphas = model.shortcut_coefficients
    class_name, subfolder = FAMILIES[model_args.model]
    model_name = Path(repo_id).name
    task = "class-conditional-image-generation" if num_classes else GENERATION_TASK_TYPE
    card_data = ModelCardData(
        library_name="diffusers",
        license=args.license,
        pipeline_tag=None if num_classes else GENERATION_TASK_TYPE,  # the Hub has no class-conditional task
        tags=["decayed-shortcuts", "hf_resdecay", f"{model_args.model}-decay", task],
        datasets=[dataset_name],
        model_name=model_name,
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
        model_name=model_name,
        repo_id=repo_id,
        on_hub=args.push_to_hub,
        family="UNet2D" if model_args.model == "unet" else "DiT",
        class_name=class_name,
        subfolder=subfolder,
        scheduler_class=type(info["scheduler"]).__name__,
        pipeline=model_args.model == "unet",
        dit_pipeline=model_args.model == "dit",
        space=f"latent-space (VAE {args.vae})" if args.vae else "pixel-space",
        guidance_scale=args.guidance_scale,
        dataset_name=dataset_name,
        shortcut_decay=model.config.shortcut_decay,
        shortcut_schedule=model.config.shortcut_schedule,
        num_units=len(alphas),
        alpha_first=f"{alphas[0]:.3f}",
        alpha_last=f"{alphas[-1]:.3f}",
        alpha_eff=f"{alpha_eff(alphas):.3g}",
        long_skips=getattr(model.config, "long_skip_connections", "n/a (the UNet has its own)"),
        train_samples=train_size,
        image_size=model.config.sample_size,
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
    model_args, data_args, args = parse_arguments(argv)
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
    conditional = model_args.model == "dit" and args.class_conditional is not False
    num_classes = len(class_names) if class_names and conditional else None
    class_names = class_names if num_classes else None
    if args.class_conditional and not num_classes:
        fail("--class_conditional needs a dataset whose label column is a ClassLabel (names its classes)")
    if args.guidance_scale != 1.0 and not num_classes:
        fail(f"--guidance_scale {args.guidance_scale} needs a class-conditional DiT; use 1.0 (no guidance)")
    vae, image_size, built_args = None, model_args.image_size, model_args
    if args.vae:  # the DiT models the VAE's latents: their channels, and their size (the images' / factor)
        try:
            vae = load_vae(args.vae, accelerator.device)
            if image_size is None:
                raise ValueError("--vae needs --image_size (the images' size; the DiT's is the latents')")
            channels, latent_size = latent_geometry(vae.config, image_size)
        except ValueError as error:
            fail(str(error))
        built_args = dataclasses.replace(model_args, image_size=latent_size)
    set_seed(args.seed)  # model initialisation
    try:
        model = build_model(built_args, channels, num_classes)
    except (ValueError, TypeError, OSError) as error:
        fail(" ".join(str(error).split()))
    if vae is not None and model.config.in_channels != channels:
        fail(f"--vae {args.vae} makes {channels}-channel latents; the DiT takes {model.config.in_channels}")
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    scheduler_kind = make_scheduler(args.objective, args.num_train_timesteps)
    labels = label_column if num_classes else None
    cached_latents = None
    if args.cache_latents:
        if data_args.streaming:
            fail("--cache_latents needs a map-style dataset; drop --streaming")
        try:  # one process encodes, the others read the verified entry
            with accelerator.main_process_first():
                moments, cached_latents = cache_latents(
                    vae, train, image_column, image_size, hflip=data_args.hflip,
                    batch_size=args.per_device_train_batch_size, num_workers=args.dataloader_num_workers,
                    skip_bad_images=data_args.skip_bad_images, autocast_dtype=autocast_dtype(accelerator),
                    progress=accelerator.is_local_main_process,
                )  # fmt: skip
        except ValueError as error:
            fail(str(error))
        data = CachedLatents(moments, train[label_column] if labels else None, args.seed)
        loader = latent_loader(accelerator, data, args)
    else:
        if vae is not None:
            transform = ImageTransform(image_size, vae.config.in_channels, "center", hflip=data_args.hflip)
        else:
            transform = ImageTransform(model.config.sample_size, channels, "center", hflip=data_args.hflip)
        try:  # a few images are decoded first: a broken dataset fails here
            loader, data = training_loader(
                accelerator, train, image_column, transform, args, data_args, labels
            )
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

    label_dropout = args.label_dropout if num_classes else 0.0

    def train_step(batch: dict, generator: torch.Generator, log_now: bool) -> tuple[torch.Tensor, dict]:
        if vae is None:
            clean = (batch["pixel_values"].float() / 127.5 - 1).to(dtype)  # uint8 to [-1, 1]
        else:  # the encoder's Gaussian (cached, or of this batch on the device), drawn with the step's RNG
            moments = batch.get("latent_moments")
            if moments is None:
                moments = encode_moments(vae, batch["pixel_values"], autocast_dtype(accelerator))
            clean = latents_from_moments(moments, vae.config, generator).to(dtype)
        loss = diffusion_loss(model, scheduler_kind, clean, batch.get("labels"), generator, label_dropout)
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
                announce(accelerator, f"epoch {epoch}: sampling {args.num_samples} images...")
                sample_grid(averaged, scheduler, args, num_classes, grid, vae, class_names)
                announce(accelerator, f"epoch {epoch}: samples in {grid}")

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
        sample_grid(final, sampler, args, num_classes, staging / "samples" / "final.png", vae, class_names)
        class_name = FAMILIES[model_args.model][0]
        if model_args.model == "unet":
            from diffusers import DDPMPipeline

            DDPMPipeline(unet=final, scheduler=sampler).save_pretrained(staging)
            make_pipeline_portable(staging)
        else:  # transformer/, scheduler/ and vae/ (latent runs): hf-resdecay evaluate --metrics fid loads it
            dit_pipeline(final, sampler, args, vae, class_names).save_pretrained(staging)
            results["guidance_scale"] = args.guidance_scale
        if vae is not None:
            results["latents"] = {
                "vae": args.vae,
                "scaling_factor": vae.config.scaling_factor,
                "shift_factor": getattr(vae.config, "shift_factor", None),
                "image_size": image_size,
                "cached": None if cached_latents is None else {"reused": cached_latents},
            }
        results["model"] = {
            "class": class_name,
            "shortcut_coefficients": final.shortcut_coefficients,
            "alpha_eff": alpha_eff(final.shortcut_coefficients),
        }
        repo_id = card_model_id(output_dir, args.hub_model_id, args.push_to_hub)
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
        marker = "model_index.json"
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
