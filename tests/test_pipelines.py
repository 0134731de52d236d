"""A pipeline with a decayed UNet, made portable, loads from the local Hub with and without the package."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from huggingface_hub import HfApi

from hf_resdecay import UNet2DDecayModel
from hf_resdecay.pipelines import load_pipeline, make_pipeline_portable

from .models.unet_2d_decay.helpers import TINY
from .without_package import run_without_package

LOAD = """
import sys, torch
from diffusers import DiffusionPipeline
from huggingface_hub import snapshot_download
pipeline = DiffusionPipeline.from_pretrained(snapshot_download(sys.argv[1]), trust_remote_code=True)
pipeline.set_progress_bar_config(disable=True)
generator = torch.Generator().manual_seed(0)
images = pipeline(batch_size=2, num_inference_steps=2, generator=generator, output_type="np").images
print(type(pipeline.unet).__name__, images.sum())
"""


def test_portable_pipeline_from_the_hub_with_and_without_the_package(hub_server, tmp_path):
    torch.manual_seed(0)
    pipeline = DDPMPipeline(unet=UNet2DDecayModel(**TINY), scheduler=DDPMScheduler(num_train_timesteps=10))
    pipeline.save_pretrained(tmp_path / "p")
    assert make_pipeline_portable(tmp_path / "p") == ["unet"]
    assert json.loads((tmp_path / "p" / "model_index.json").read_text())["unet"] == [
        "unet_2d_decay",
        "UNet2DDecayModel",
    ]
    assert make_pipeline_portable(tmp_path / "p") == []  # idempotent
    api = HfApi()
    api.create_repo("org/portable-ddpm")
    api.upload_folder(repo_id="org/portable-ddpm", folder_path=str(tmp_path / "p"))

    with_package = subprocess.run(
        [sys.executable, "-c", LOAD, "org/portable-ddpm"], capture_output=True, text=True
    )
    assert with_package.returncode == 0, with_package.stderr[-3000:]
    without = run_without_package(LOAD, "org/portable-ddpm")
    assert with_package.stdout.split()[0] == "UNet2DDecayModel"
    assert without.stdout.split() == with_package.stdout.split()  # the same code and samples either way
    pipeline = load_pipeline("org/portable-ddpm", trust_remote_code=True)
    assert type(pipeline.unet).__name__ == "UNet2DDecayModel"
    pipeline = load_pipeline("org/portable-ddpm")  # the package's own class: installed code, no remote code
    assert type(pipeline.unet) is UNet2DDecayModel


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="pipeline_dir must be a saved pipeline folder"):
        make_pipeline_portable(tmp_path)
    (tmp_path / "model_index.json").write_text(
        json.dumps({"unet": ["hf_resdecay.models.unet_2d_decay", "X"]})
    )
    with pytest.raises(FileNotFoundError, match=r"unet/unet_2d_decay\.py is missing"):
        make_pipeline_portable(tmp_path)
