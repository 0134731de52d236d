"""The shared training pieces, one by one; the scripts that use them are tested in tests/training_scripts."""

import json

import pytest
import torch
from accelerate import Accelerator

from hf_resdecay import ViTMAEDecayConfig, ViTMAEDecayForPreTraining
from hf_resdecay.training import (
    CommonTrainingArguments,
    DataArguments,
    MetricsLog,
    checkpoint_dirs,
    checkpoint_step,
    load_splits,
    parameter_groups,
    publish_directory,
    resolve_resume,
    resume_state,
    save_checkpoint,
    step_rng,
    step_seed,
    stop_if_diverged,
    with_retries,
)


def test_step_rng_is_a_function_of_its_indices_and_restores_the_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    with step_rng(0, 1, 7) as generator:
        inside = torch.rand(3)
        explicit = torch.rand(3, generator=generator)
    assert torch.equal(torch.rand(1), expected_next)  # the global stream continues as if untouched
    with step_rng(0, 1, 7):
        assert torch.equal(torch.rand(3), inside)
    with step_rng(0, 1, 8):
        assert not torch.equal(torch.rand(3), inside)
    torch.testing.assert_close(
        explicit, torch.rand(3, generator=torch.Generator().manual_seed(step_seed(0, 1, 7)))
    )
    assert step_seed(0, 1, 7) != step_seed(1, 1, 7) and 0 <= step_seed(5) < 2**63


def test_parameter_groups_decay_matrices_only():
    config = ViTMAEDecayConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=8,
        patch_size=4, decoder_hidden_size=8, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=16,
    )  # fmt: skip
    model = ViTMAEDecayForPreTraining(config)
    decay, no_decay = parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 and "token" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {
        "vit.embeddings.cls_token",
        "decoder.decoder_norm.weight",
    }
    trainable = [p for p in model.parameters() if p.requires_grad]  # fixed sin-cos tables are frozen
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable) < len(list(model.parameters()))


def test_checkpoints_save_resume_and_rotate(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(3, 2))
    for step in (10, 20, 30):
        with torch.no_grad():
            model.weight.fill_(step)
        save_checkpoint(accelerator, tmp_path, step, keep=2)
    (tmp_path / "checkpoint-40.partial").mkdir()  # what a killed save leaves behind
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-20", "checkpoint-30"]
    assert resolve_resume(tmp_path, "latest").name == "checkpoint-30"
    assert resolve_resume(tmp_path, None) is None and resolve_resume(tmp_path / "none", "latest") is None
    with torch.no_grad():
        model.weight.zero_()
    assert resume_state(accelerator, tmp_path, str(tmp_path / "checkpoint-20")) == (20, {})
    assert torch.all(model.weight == 20)
    assert not (tmp_path / "checkpoint-40.partial").exists()
    with pytest.raises(ValueError, match="no such checkpoint directory"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-99"))
    with pytest.raises(ValueError, match="is not a checkpoint directory"):
        checkpoint_step(tmp_path / "final")


def test_publish_directory_replaces_the_model_and_keeps_other_files(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text("old")
    (target / "keep.txt").write_text("results of another step")
    staging = tmp_path / "staging"
    (staging / "sub").mkdir(parents=True)
    (staging / "config.json").write_text("new")
    (staging / "model.safetensors").write_bytes(b"w")
    (staging / "sub" / "x.py").write_text("code")
    publish_directory(staging, target)
    assert (target / "config.json").read_text() == "new" and (target / "sub" / "x.py").exists()
    assert (target / "keep.txt").exists() and not staging.exists()


def test_with_retries_backs_off_then_names_what_failed(capsys):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("503")
        return "done"

    assert with_retries(flaky, "uploading", attempts=3, base_delay=0) == "done"
    assert capsys.readouterr().out.count("retrying") == 2
    with pytest.raises(RuntimeError, match="uploading failed after 2 attempts: 503"):
        with_retries(lambda: (_ for _ in ()).throw(ConnectionError("503")), "uploading", 2, base_delay=0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hub_strategy": "every_save"}, "--hub_strategy must be one of end, checkpoint; got 'every_save'"),
        ({"push_to_hub": True}, "--push_to_hub needs --hub_model_id"),
        ({"mixed_precision": "fp8"}, "--mixed_precision must be one of no, fp16, bf16; got 'fp8'"),
        ({"report_to": "mlflow"}, "--report_to must be one of none, tensorboard, wandb; got 'mlflow'"),
        ({"per_device_train_batch_size": 0}, "--per_device_train_batch_size must be >= 1; got 0"),
        ({"checkpointing_steps": -1}, "--checkpointing_steps must be >= 0; got -1"),
    ],
)
def test_common_arguments_are_checked(changes, message):
    CommonTrainingArguments(output_dir="x").check()
    with pytest.raises(ValueError, match=message):
        CommonTrainingArguments(output_dir="x", **changes).check()


def test_load_splits(digits_dataset, tmp_path):
    folder = tmp_path / "digits"
    digits_dataset.save_to_disk(folder)
    train, validation, image_column, label_column = load_splits(
        DataArguments(dataset_name=str(folder), max_train_samples=100)
    )
    assert (len(train), len(validation), image_column, label_column) == (100, 450, "image", "label")
    for args, message in [
        (DataArguments(dataset_name=str(folder), train_dir="x"), "either --dataset_name or --train_dir"),
        (DataArguments(dataset_name=str(folder), train_split="all"), "--train_split 'all' is not in"),
        (DataArguments(dataset_name=str(folder), validation_split="val"), "--validation_split 'val'"),
        (DataArguments(dataset_name=str(folder), image_column_name="img"), "--image_column_name 'img'"),
        (DataArguments(dataset_name=str(folder), label_column_name="y"), "--label_column_name 'y'"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_splits(args)


def test_metrics_log_appends_json_lines(tmp_path):
    log = MetricsLog(Accelerator(cpu=True), tmp_path / "logs" / "metrics.jsonl", trackers=False)
    log({"loss": 0.5}, 1)
    log({"loss": 0.25, "knn_top1": 40.0}, 2)
    lines = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25, "knn_top1": 40.0}]


def test_stop_if_diverged_exits_on_a_non_finite_loss_or_weights(capsys):
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    stop_if_diverged(accelerator, 3, 1e-3, "--learning_rate", loss=0.5, parameters=model.parameters())
    hint = "lr 0.001: lower --learning_rate or set --max_grad_norm (e.g. 1.0); the model was not saved"
    for loss in (float("nan"), float("inf")):
        with pytest.raises(SystemExit) as stopped:
            stop_if_diverged(accelerator, 3, 1e-3, "--learning_rate", loss=loss)
        assert stopped.value.code == 1
        assert capsys.readouterr().err == f"error: non-finite training loss ({loss}) at step 3, {hint}\n"
    with torch.no_grad():
        model.weight[0, 1] = float("nan")
    with pytest.raises(SystemExit):
        stop_if_diverged(accelerator, 4, 1e-3, "--learning_rate", parameters=model.parameters())
    assert capsys.readouterr().err == f"error: non-finite weights at step 4, {hint}\n"
