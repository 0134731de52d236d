"""``accelerate launch training_scripts/train_mae.py`` end to end, on the embedded MNIST, tiny models."""

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from hf_resdecay import ViTMAEDecayConfig, ViTMAEDecayForPreTraining

from .launch import launch, launch_and_kill, run_in_process

TINY = [
    "--image_size",
    "16",
    "--patch_size",
    "4",
    "--hidden_size",
    "32",
    "--num_hidden_layers",
    "2",
    "--num_attention_heads",
    "2",
    "--intermediate_size",
    "64",
    "--decoder_hidden_size",
    "16",
    "--decoder_num_hidden_layers",
    "1",
    "--decoder_num_attention_heads",
    "2",
    "--decoder_intermediate_size",
    "32",
    "--per_device_train_batch_size",
    "32",
    "--max_train_samples",
    "256",
    "--max_eval_samples",
    "128",
    "--knn_train_samples",
    "256",
    "--knn_eval_samples",
    "128",
    "--base_learning_rate",
    "1e-3",
]


def _launch(*args, processes: int = 1, env: dict | None = None, check: bool = True, precision: str = "no"):
    return launch(
        "train_mae.py", [*TINY, *args], processes=processes, env=env, check=check, precision=precision
    )


def _lr_by_step(output_dir) -> dict[int, float]:
    lines = (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row["lr"] for row in map(json.loads, lines) if "lr" in row}


def test_accumulation_keeps_the_schedule_and_the_launcher_sets_the_precision(tmp_path):
    """Batch 32 x 1 and 8 x 4 (same global batch): same optimizer steps, same warmup + cosine lr per step;
    the launcher's accumulation and precision are the ones used, whatever the script's flags say."""
    common = [
        "--num_train_epochs",
        "2",
        "--warmup_epochs",
        "0.5",
        "--logging_steps",
        "1",
        "--eval_every",
        "0",
    ]
    runs = {}
    for batch, accumulation in ((32, 1), (8, 4)):
        out = tmp_path / f"accumulate-{accumulation}"
        _launch(  # accumulation 4 comes from the launcher's environment (as a DeepSpeed config sets it)
            *common,
            "--output_dir",
            str(out),
            "--per_device_train_batch_size",
            str(batch),
            env={"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": str(accumulation)},
            precision="bf16" if accumulation == 4 else "no",
        )
        runs[accumulation] = (_lr_by_step(out), json.loads((out / "results.json").read_text()))
    (lr_1, results_1), (lr_4, results_4) = runs[1], runs[4]
    assert results_1["steps"] == results_4["steps"] == 16  # 256 images / 32 per step, 2 epochs
    assert sorted(lr_1) == sorted(lr_4) == list(range(1, 17))
    peak = results_1["run"]["learning_rate"]
    for step in range(1, 17):  # lr after `step` optimizer steps: 4 warmup steps, then cosine to 0 at 16
        expected = peak * step / 4 if step < 4 else peak * 0.5 * (1 + math.cos(math.pi * (step - 4) / 12))
        assert lr_1[step] == pytest.approx(expected, abs=1e-12) and lr_4[step] == pytest.approx(
            expected, abs=1e-12
        )
    assert results_1["run"] == {**results_4["run"], "mixed_precision": "no", "gradient_accumulation_steps": 1}
    assert (
        results_4["run"]["mixed_precision"] == "bf16" and results_4["run"]["gradient_accumulation_steps"] == 4
    )
    assert results_4["run"]["global_batch"] == 32


def test_streaming_run_killed_and_resumed_ends_with_the_same_weights(tmp_path):
    """``--streaming``: an IterableDataset split per process and shuffled in a buffer, decoded in a worker;
    a kill and ``--resume_from_checkpoint latest`` skip exactly the batches already trained on (the stream
    holds 256 images, 8 batches: the run crosses an epoch boundary)."""
    args = ["--streaming", "--max_train_steps", "12", "--warmup_steps", "2", "--checkpointing_steps", "4"]
    args += ["--shuffle_buffer_size", "64", "--dataloader_num_workers", "1", "--eval_every", "1"]
    _launch("--output_dir", str(tmp_path / "straight"), *args)
    killed = tmp_path / "killed"
    launch_and_kill(
        "train_mae.py", [*TINY, "--output_dir", str(killed), *args], killed / "checkpoints" / "checkpoint-4"
    )
    _launch("--output_dir", str(killed), *args, "--resume_from_checkpoint", "latest")
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(killed / "model.safetensors")
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert results["steps"] == 12 and results["epochs"] == 2  # 8 steps a pass over the stream
    assert [entry["step"] for entry in results["knn_history"]] == [8]
    position = json.loads((killed / "checkpoints" / "checkpoint-12" / "loop_state.json").read_text())
    assert position == {"step": 12, "epoch": 1, "batches": 4}


def test_gradient_checkpointing_and_compile_change_no_weight(tmp_path):
    """Recomputed activations and a compiled model (dynamo graphs through AOT autograd) train to the same
    weights as the plain eager model; results.json says what was used."""
    args = ["--max_train_steps", "3", "--eval_every", "0", "--dataloader_num_workers", "0"]
    _launch("--output_dir", str(tmp_path / "plain"), *args)
    fast = ["--gradient_checkpointing", "--torch_compile", "--torch_compile_backend", "aot_eager"]
    _launch("--output_dir", str(tmp_path / "compiled"), *args, *fast)
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    compiled = load_file(tmp_path / "compiled" / "model.safetensors")
    for name, tensor in plain.items():
        torch.testing.assert_close(compiled[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    run = json.loads((tmp_path / "compiled" / "results.json").read_text())["run"]
    assert run["torch_compile"] == "aot_eager" and run["gradient_checkpointing"] is True
    run = json.loads((tmp_path / "plain" / "results.json").read_text())["run"]
    assert run["torch_compile"] is False and run["gradient_checkpointing"] is False


def test_train_push_and_load_from_the_hub(hub_server, tmp_path):
    out = tmp_path / "run"
    result = _launch(
        "--output_dir",
        str(out),
        "--max_train_steps",
        "16",
        "--checkpointing_steps",
        "8",
        "--logging_steps",
        "4",
        "--push_to_hub",
        "--hub_model_id",
        "org/vitmae-decay-trained",
    )
    assert "final kNN top-1:" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 16 and 0 <= results["summary"]["knn_top1"] <= 100
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["checkpoint-16", "checkpoint-8"]
    logged = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged if "loss" in entry] == [4, 8, 12, 16]
    assert {"feature_norm/block_0", "feature_norm/block_1"} <= set(logged[0])

    card = ModelCard.load("org/vitmae-decay-trained")
    assert 'AutoModel.from_pretrained("org/vitmae-decay-trained")' in card.text  # "How to load": the Hub id
    assert "alpha_eff" in card.text and card.data.eval_results[0].metric_value == pytest.approx(
        results["summary"]["knn_top1"], abs=1e-3
    )
    check = (
        "import hf_resdecay, transformers; "
        "m = transformers.AutoModel.from_pretrained('org/vitmae-decay-trained'); "
        "print(type(m).__name__, m.config.shortcut_decay, len(m.layers))"
    )
    fresh = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert fresh.stdout.split() == ["ViTMAEDecayModel", "0.3", "2"]


def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path):
    args = ["--max_train_steps", "20", "--checkpointing_steps", "4", "--eval_every", "1", "--seed", "7"]
    _launch("--output_dir", str(tmp_path / "straight"), *args)

    killed = tmp_path / "killed"
    # mid-epoch: 8 steps per epoch
    launch_and_kill(
        "train_mae.py", [*TINY, "--output_dir", str(killed), *args], killed / "checkpoints" / "checkpoint-12"
    )
    assert not (killed / "config.json").exists()
    _launch("--output_dir", str(killed), *args, "--resume_from_checkpoint", "latest")

    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(killed / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        assert (tensor == resumed[name]).all(), name
    assert (
        json.loads((killed / "results.json").read_text())["summary"]
        == json.loads((tmp_path / "straight" / "results.json").read_text())["summary"]
    )


def test_two_processes_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    _launch(
        "--output_dir",
        str(out),
        "--max_train_steps",
        "4",
        "--eval_every",
        "0",
        processes=2,
        env={"ACCELERATE_USE_CPU": "1"},
    )
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 4 and "knn_top1" in results["summary"]


def test_failed_upload_keeps_the_local_model(tmp_path):
    out = tmp_path / "run"
    closed = "http://127.0.0.1:9"  # discard port: nothing listens
    result = _launch(
        "--output_dir",
        str(out),
        "--max_train_steps",
        "2",
        "--eval_every",
        "0",
        "--push_to_hub",
        "--hub_model_id",
        "org/never",
        "--hub_upload_attempts",
        "2",
        env={"HF_ENDPOINT": closed},
        check=False,
    )
    assert result.returncode == 1
    assert "failed after 2 attempts" in result.stderr and "The trained model is complete in" in result.stderr
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()


def test_non_finite_loss_stops_every_process_and_keeps_the_previous_model(tmp_path):
    """An exploding lr used to train on NaN for the whole budget; now both ranks stop at the first NaN loss,
    with one error line, and the model already in the output folder stays as it was."""
    out = tmp_path / "run"
    out.mkdir()
    previous = {"config.json": "{}", "model.safetensors": "previous weights", "results.json": '{"steps": 4}'}
    for name, text in previous.items():
        (out / name).write_text(text)
    result = _launch(
        "--output_dir",
        str(out),
        "--base_learning_rate",
        "1e30",
        "--max_train_steps",
        "8",
        "--checkpointing_steps",
        "1",
        "--eval_every",
        "0",
        processes=2,
        env={"ACCELERATE_USE_CPU": "1"},
        check=False,
    )
    assert result.returncode != 0, result.stdout[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-4000:]  # one line, from the main process only
    assert re.fullmatch(
        r"error: non-finite (training loss \((nan|inf|-inf)\)|weights) at step [1-8], lr [0-9.e+]+: lower "
        r"--base_learning_rate or set --max_grad_norm \(e\.g\. 1\.0\); the model was not saved",
        errors[0],
    ), errors[0]
    assert "model saved" not in result.stdout
    assert {path.name: path.read_text() for path in out.iterdir() if path.is_file()} == previous
    checkpoints = sorted((out / "checkpoints").iterdir()) if (out / "checkpoints").exists() else []
    assert [path.name for path in checkpoints if path.name.endswith(".partial")] == []
    for checkpoint in checkpoints:  # the weights of every checkpoint kept are finite
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())


def test_hyphenated_flags_change_a_checkpoint(tmp_path):
    """``--shortcut-decay 0.5`` used to be ignored when starting from a model (abbreviations are refused:
    tests/training/test_arguments.py)."""
    sizes = dict(zip(TINY[0:20:2], TINY[1:20:2], strict=True))
    config = ViTMAEDecayConfig(**{flag[2:]: int(value) for flag, value in sizes.items()})
    ViTMAEDecayForPreTraining(config).save_pretrained(tmp_path / "start")
    out = tmp_path / "run"
    args = [
        "--model_name_or_path",
        str(tmp_path / "start"),
        "--shortcut-decay",
        "0.5",
        "--shortcut-schedule=cosine",
    ]
    args += ["--max_train_samples", "64", "--per_device_train_batch_size", "32", "--max_train_steps", "1"]
    launch("train_mae.py", [*args, "--eval_every", "0", "--max_eval_samples", "32", "--output_dir", str(out)])
    saved = json.loads((out / "config.json").read_text())
    assert (saved["shortcut_decay"], saved["shortcut_schedule"]) == (0.5, "cosine")
    assert saved["hidden_size"] == 32 and saved["mask_ratio"] == 0.75  # the rest from the checkpoint


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image_column_name", "photo"], "--image_column_name 'photo' is not a column of the dataset"),
        (["--image_size", "30"], "image_size=30 must be divisible by patch_size=4"),
        (["--shortcut_decay", "-0.1"], r"shortcut_decay must be in [0, 1)"),
        (["--shortcut_schedule", "step"], "--shortcut-schedule: invalid choice: 'step' (choose from"),
        (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
    ],
)
def test_bad_arguments_stop_before_training(tmp_path, args, message):
    result = run_in_process("train_mae.py", [*TINY, "--output_dir", str(tmp_path / "bad"), *args])
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr
    assert not (tmp_path / "bad").exists()
