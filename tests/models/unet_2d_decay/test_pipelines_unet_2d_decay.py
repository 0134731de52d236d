"""DDPM and DDIM sampling with the decayed UNet, and pipeline save/load."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

from hf_resdecay import UNet2DDecayModel

from .helpers import TINY

PIPELINES = {
    "ddpm": (DDPMPipeline, DDPMScheduler, {"num_inference_steps": 10}),
    "ddim": (DDIMPipeline, DDIMScheduler, {"num_inference_steps": 4, "eta": 0.0}),
}


def _pipeline(kind: str):
    pipeline_class, scheduler_class, _ = PIPELINES[kind]
    torch.manual_seed(0)
    unet = UNet2DDecayModel(**TINY, shortcut_decay=0.2)
    pipeline = pipeline_class(unet=unet, scheduler=scheduler_class(num_train_timesteps=10))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _sample(pipeline, kind: str, seed: int) -> np.ndarray:
    call_kwargs = PIPELINES[kind][2]
    generator = torch.Generator().manual_seed(seed)
    return pipeline(batch_size=2, generator=generator, output_type="np", **call_kwargs).images


@pytest.mark.parametrize("kind", sorted(PIPELINES))
def test_sampling_shapes_and_determinism(kind):
    pipeline = _pipeline(kind)
    images = _sample(pipeline, kind, seed=0)
    assert images.shape == (2, TINY["sample_size"], TINY["sample_size"], 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    np.testing.assert_array_equal(_sample(pipeline, kind, seed=0), images)
    assert np.abs(_sample(pipeline, kind, seed=1) - images).max() > 1e-3


@pytest.mark.parametrize("kind", sorted(PIPELINES))
def test_pipeline_save_and_load_keeps_the_decayed_unet(kind, tmp_path):
    pipeline = _pipeline(kind)
    pipeline.save_pretrained(tmp_path)
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    # diffusers records a component from outside its libraries under its full module path; loading it
    # back needs that module imported (this test module imported hf_resdecay.UNet2DDecayModel)
    assert model_index["unet"] == ["hf_resdecay.models.unet_2d_decay", "UNet2DDecayModel"]
    assert {"unet_2d_decay.py", "shortcut.py"} <= {path.name for path in (tmp_path / "unet").iterdir()}

    loaded = PIPELINES[kind][0].from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.unet) is UNet2DDecayModel
    assert loaded.unet.shortcut_coefficients == pipeline.unet.shortcut_coefficients
    np.testing.assert_allclose(_sample(loaded, kind, seed=0), _sample(pipeline, kind, seed=0), atol=1e-6)
