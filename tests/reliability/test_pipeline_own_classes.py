"""Pipelines of the package's own models load from the installed package, never from the shipped code."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from hf_resdecay import UNet2DDecayModel
from hf_resdecay.cli import main
from hf_resdecay.pipelines import load_pipeline, make_pipeline_portable

from ..models.unet_2d_decay.helpers import TINY


@pytest.fixture
def planted(tmp_path):
    """A portable decayed-UNet pipeline whose shipped code file would leave a marker and fail if run."""
    torch.manual_seed(0)
    pipeline = DDPMPipeline(unet=UNet2DDecayModel(**TINY), scheduler=DDPMScheduler(num_train_timesteps=10))
    pipeline.set_progress_bar_config(disable=True)
    folder = tmp_path / "pipeline"
    pipeline.save_pretrained(folder)
    assert make_pipeline_portable(folder) == ["unet"]
    marker = tmp_path / "shipped-code-ran"
    trap = f"open({str(marker)!r}, 'w').write('ran')\nraise RuntimeError('the shipped file was executed')\n"
    (folder / "unet" / "unet_2d_decay.py").write_text(trap)
    return pipeline, folder, marker


def _samples(pipeline) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipeline(batch_size=2, num_inference_steps=2, generator=generator, output_type="np").images


def test_portable_pipeline_loads_without_remote_code_from_the_installed_package(planted):
    original, folder, marker = planted
    pipeline = load_pipeline(folder)
    pipeline.set_progress_bar_config(disable=True)
    assert type(pipeline.unet) is UNet2DDecayModel and not marker.exists()
    assert pipeline.name_or_path == str(folder)
    np.testing.assert_allclose(_samples(pipeline), _samples(original), atol=1e-6)

    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["hf_resdecay.models.unet_2d_decay", "UNet2DDecayModel"]  # as save_pretrained wrote it
    (folder / "model_index.json").write_text(json.dumps(index))
    assert type(load_pipeline(folder).unet) is UNet2DDecayModel and not marker.exists()


def test_other_custom_code_still_needs_trust_remote_code(planted):
    _, folder, marker = planted
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["unet_2d_decay", "SomeoneElsesUNet"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_pipeline(folder)
    assert not marker.exists()


def test_fd_of_a_decayed_unet_pipeline_through_the_cli_without_trust_remote_code(
    planted, digits_dataset, tmp_path
):
    from transformers import ViTConfig, ViTModel

    _, folder, marker = planted
    torch.manual_seed(0)
    encoder = tmp_path / "encoder"
    config = ViTConfig(hidden_size=4, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    config.image_size, config.patch_size = 16, 8
    ViTModel(config).save_pretrained(encoder)
    data = tmp_path / "digits"
    digits_dataset.save_to_disk(data)
    out = tmp_path / "fd.json"
    args = ["evaluate", str(folder), "--dataset", str(data), "--metrics", "fid", "--fid-samples", "8"]
    args += ["--fid-feature-model", str(encoder), "--max-test-samples", "8", "--num-inference-steps", "2"]
    assert main([*args, "--output", str(out)]) == 0
    assert np.isfinite(json.loads(out.read_text())["summary"]["fd"]) and not marker.exists()
