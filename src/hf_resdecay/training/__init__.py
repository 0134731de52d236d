"""Pieces shared by the training scripts: their common arguments and data loading, reproducible randomness,
crash-safe checkpoints and outputs, a stop at the first non-finite loss, optimiser parameter groups, metric
logs, and Hub uploads that retry.

Reproducibility across a kill and a resume rests on two choices. Every random draw of an optimisation step
(augmentation, masking, dropout) comes from a generator seeded by ``(seed, rank, step, micro-batch)``
(:func:`step_rng`), so it does not depend on what ran before; and the data order comes from Accelerate's
seedable sampler (``seed + epoch``). A run resumed from a checkpoint therefore replays exactly the steps an
uninterrupted run would have taken.

The package's modules, each one job: :mod:`.arguments` (flags and data), :mod:`.runtime` (Accelerator,
RNG, divergence stop, schedule lengths, logs), :mod:`.checkpoints` (save and resume), :mod:`.distributed`
(what must work on sharded models: gathering weights, evaluation copies, input dtypes, EMA), :mod:`.images`
(the training image pipeline), :mod:`.loop` (the loop both scripts drive), :mod:`.publish` (atomic output,
Hub), :mod:`.lock` (one run per output folder).
"""

from .arguments import (
    CommonTrainingArguments,
    DataArguments,
    ScriptArgumentParser,
    ShortcutSchedule,
    check_choices,
    fail,
    given_fields,
    load_splits,
    parse_config_overrides,
)
from .checkpoints import (
    CHECKPOINT_PREFIX,
    CheckpointError,
    check_checkpoint,
    checkpoint_dirs,
    checkpoint_step,
    remove_partial_checkpoints,
    resolve_resume,
    resume_state,
    save_checkpoint,
)
from .distributed import full_state_dict, input_dtype, is_sharded, make_ema, unsharded_model
from .lock import OutputLocked, RunLock, hold_output_lock
from .loop import LoopResult, TrainingLoop
from .publish import publish_directory, push_final_model, push_folder, recover_publish, with_retries
from .runtime import (
    MetricsLog,
    SchedulePlan,
    announce,
    enable_gradient_checkpointing,
    exit_interrupted,
    make_accelerator,
    parameter_groups,
    plan_schedule,
    resume_command,
    run_settings,
    step_rng,
    step_seed,
    stop_if_diverged,
)

__all__ = [
    "CHECKPOINT_PREFIX",
    "CheckpointError",
    "CommonTrainingArguments",
    "DataArguments",
    "LoopResult",
    "MetricsLog",
    "OutputLocked",
    "RunLock",
    "SchedulePlan",
    "ScriptArgumentParser",
    "ShortcutSchedule",
    "TrainingLoop",
    "announce",
    "check_checkpoint",
    "check_choices",
    "checkpoint_dirs",
    "checkpoint_step",
    "enable_gradient_checkpointing",
    "exit_interrupted",
    "fail",
    "full_state_dict",
    "given_fields",
    "hold_output_lock",
    "input_dtype",
    "is_sharded",
    "load_splits",
    "make_accelerator",
    "make_ema",
    "parameter_groups",
    "parse_config_overrides",
    "plan_schedule",
    "publish_directory",
    "push_final_model",
    "push_folder",
    "recover_publish",
    "remove_partial_checkpoints",
    "resolve_resume",
    "resume_command",
    "resume_state",
    "run_settings",
    "save_checkpoint",
    "step_rng",
    "step_seed",
    "stop_if_diverged",
    "unsharded_model",
    "with_retries",
]
