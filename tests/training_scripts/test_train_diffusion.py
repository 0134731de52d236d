"""``accelerate launch training_scripts/train_diffusion.py`` end to end on the embedded MNIST, tiny models."""

import json
import re
import subprocess
import sys

import pytest
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

from .launch import launch, launch_and_kill, run_in_process

DATA = ["--max_train_samples", "128", "--image_size", "16", "--per_device_train_batch_size", "16"]
UNET = ["--model", "unet", "--block_out_channels", "8,16", *DATA]
DIT = [
    "--model",
    "dit",
    "--num_layers",
    "4",
    "--num_attention_heads",
    "2",
    "--attention_head_dim",
    "8",
    *DATA,
]
QUICK = ["--num_samples", "4", "--num_inference_steps", "3", "--num_train_timesteps", "50"]


def test_unet_ddpm_trains_saves_a_pipeline_and_pushes(hub_server, tmp_path):
    out = tmp_path / "unet"
    args = [*UNET, *QUICK, "--output_dir", str(out), "--max_train_steps", "10", "--sample_every", "0"]
    result = launch("train_diffusion.py", [*args, "--push_to_hub", "--hub_model_id", "org/unet-decay"])
    assert "final training loss" in result.stdout and "pushed to org/unet-decay" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 10 and results["model"]["class"] == "UNet2DDecayModel"
    assert results["model"]["shortcut_coefficients"][-1] == pytest.approx(0.8)
    with Image.open(out / "samples" / "final.png") as grid:
        assert grid.size == (32, 32) and grid.mode == "L"  # 2 x 2 grid of 16 px grayscale samples

    card = ModelCard.load("org/unet-decay")
    assert 'snapshot_download("org/unet-decay")' in card.text  # "How to load": the Hub id
    assert "UNet2DDecayModel" in card.text and "alpha_eff" in card.text
    check = (
        "import torch; from hf_resdecay.pipelines import load_pipeline; "
        "p = load_pipeline('org/unet-decay', trust_remote_code=True); "
        "p.set_progress_bar_config(disable=True); "
        "g = torch.Generator().manual_seed(0); "
        "x = p(batch_size=2, num_inference_steps=2, output_type='np', generator=g); "
        "print(type(p.unet).__name__, type(p.scheduler).__name__, x.images.shape)"
    )
    fresh = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert fresh.stdout.split()[:2] == ["UNet2DDecayModel", "DDPMScheduler"]
    assert "(2, 16, 16, 1)" in fresh.stdout


def test_dit_flow_killed_and_resumed_ends_with_the_same_weights(tmp_path):
    args = [*DIT, *QUICK, "--objective", "flow", "--max_train_steps", "12", "--checkpointing_steps", "3"]
    args += ["--sample_every", "1", "--seed", "3", "--gradient_checkpointing"]
    launch("train_diffusion.py", [*args, "--output_dir", str(tmp_path / "straight")])
    killed = tmp_path / "killed"
    launch_and_kill(
        "train_diffusion.py", [*args, "--output_dir", str(killed)], killed / "checkpoints" / "checkpoint-9"
    )
    assert not (killed / "transformer" / "config.json").exists()
    launch("train_diffusion.py", [*args, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"])

    straight = load_file(tmp_path / "straight" / "transformer" / "diffusion_pytorch_model.safetensors")
    resumed = load_file(killed / "transformer" / "diffusion_pytorch_model.safetensors")
    assert straight.keys() == resumed.keys() and any("long_skip" in name for name in straight)
    for name, tensor in straight.items():
        assert (tensor == resumed[name]).all(), name
    config = json.loads((killed / "transformer" / "config.json").read_text())
    assert config["num_embeds_ada_norm"] == 10  # class-conditional on the MNIST labels
    assert json.loads((killed / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == (
        "FlowMatchEulerDiscreteScheduler"
    )
    run = json.loads((killed / "results.json").read_text())["run"]
    assert run["gradient_checkpointing"] is True and run["sharded"] is False
    assert sorted(p.name for p in (tmp_path / "straight" / "samples").iterdir()) == [
        "epoch_0001.png",
        "final.png",
    ]


def test_non_finite_loss_stops_and_keeps_the_previous_model(tmp_path):
    """An exploding lr used to end with exit status 0 and NaN weights saved over the previous model."""
    out = tmp_path / "unet"
    out.mkdir()
    previous = {"model_index.json": "{}", "results.json": '{"steps": 10}'}
    for name, text in previous.items():
        (out / name).write_text(text)
    args = [*UNET, *QUICK, "--output_dir", str(out), "--max_train_steps", "6", "--sample_every", "0"]
    result = launch("train_diffusion.py", [*args, "--learning_rate", "1e30"], check=False)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.fullmatch(
        r"error: non-finite (training loss \((nan|inf|-inf)\)|weights) at step [1-6], lr 1e\+30: lower "
        r"--learning_rate or set --max_grad_norm \(e\.g\. 1\.0\); the model was not saved",
        errors[0],
    ), result.stderr[-4000:]
    assert "model saved" not in result.stdout
    assert {path.name: path.read_text() for path in out.iterdir() if path.is_file()} == previous
    assert not (out / "unet").exists() and not (out / ".final.partial").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "vae"], "--model: invalid choice: 'vae'"),
        (["--objective", "edm"], "--objective: invalid choice: 'edm'"),
        (["--shortcut_decay", "1.0"], "--shortcut_decay must be in [0, 1)"),
        (["--model", "dit", "--patch_size", "5"], "--image_size 16 must be divisible by --patch_size 5"),
        (["--ema_decay", "1.5"], "--ema_decay must be in (0, 1)"),
        (["--image_column_name", "photo"], "--image_column_name 'photo' is not a column"),
    ],
)
def test_bad_arguments_stop_before_training(tmp_path, args, message):
    result = run_in_process("train_diffusion.py", [*DATA, "--output_dir", str(tmp_path / "bad"), *args])
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr
    assert not (tmp_path / "bad").exists()
