"""Class-conditional DiT sampling, flow matching, pipeline save/load and remote code for the decayed DiT."""

import json
import textwrap

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file, save_file

from hf_resdecay import DiTDecayTransformer2DModel

from ...without_package import run_without_package
from .helpers import TINY


def _transformer(**overrides) -> DiTDecayTransformer2DModel:
    torch.manual_seed(0)
    model = DiTDecayTransformer2DModel(**{**TINY, "shortcut_decay": 0.2, **overrides}).eval()
    with torch.no_grad():  # non-zero adaLN gates, output head and long skips: every path carries signal
        for name, parameter in model.named_parameters():
            if "norm1.linear" in name or "proj_out" in name or "long_skip" in name:
                parameter.normal_(std=0.2)
    return model


def _pipeline() -> DiTPipeline:
    torch.manual_seed(1)
    vae = AutoencoderKL(  # 4 latent channels, one level: latents and images share the 8x8 size
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=TINY["in_channels"],
        norm_num_groups=4,
        sample_size=TINY["sample_size"],
    )
    pipeline = DiTPipeline(transformer=_transformer(), vae=vae, scheduler=DDIMScheduler())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _sample(pipeline: DiTPipeline, seed: int, labels=(1, 7)) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipeline(
        class_labels=list(labels), num_inference_steps=3, generator=generator, output_type="np"
    ).images


def test_dit_pipeline_samples_deterministically():
    pipeline = _pipeline()
    images = _sample(pipeline, seed=0)
    assert images.shape == (2, TINY["sample_size"], TINY["sample_size"], 3)
    assert np.isfinite(images).all()
    np.testing.assert_array_equal(_sample(pipeline, seed=0), images)
    assert np.abs(_sample(pipeline, seed=1) - images).max() > 1e-4
    assert np.abs(_sample(pipeline, seed=0, labels=(2, 5)) - images).max() > 1e-4  # class-conditional


def test_dit_pipeline_save_and_load_keeps_the_decayed_transformer(tmp_path):
    pipeline = _pipeline()
    pipeline.save_pretrained(tmp_path)
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    # loading back needs hf_resdecay.models.dit_decay imported, as this test module did
    assert model_index["transformer"] == ["hf_resdecay.models.dit_decay", "DiTDecayTransformer2DModel"]
    assert {"dit_decay.py", "shortcut.py"} <= {path.name for path in (tmp_path / "transformer").iterdir()}

    loaded = DiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.transformer) is DiTDecayTransformer2DModel
    assert loaded.transformer.shortcut_coefficients == pipeline.transformer.shortcut_coefficients
    np.testing.assert_allclose(_sample(loaded, seed=0), _sample(pipeline, seed=0), atol=1e-6)


def test_flow_matching_euler_sampling_and_training_step():
    """SiT-style use: velocity prediction on the linear path, sampled with FlowMatchEulerDiscreteScheduler."""
    model = _transformer(out_channels=TINY["in_channels"])
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(3)
    shape = (2, TINY["in_channels"], TINY["sample_size"], TINY["sample_size"])
    labels = torch.tensor([1, 7])
    sample = torch.randn(shape, generator=generator)
    expected = sample.clone()
    with torch.no_grad():
        for index, timestep in enumerate(scheduler.timesteps):
            velocity = model(sample, timestep=timestep.expand(2), class_labels=labels).sample
            assert velocity.shape == shape
            sample = scheduler.step(velocity, timestep, sample).prev_sample
            expected = expected + (scheduler.sigmas[index + 1] - scheduler.sigmas[index]) * velocity
    assert scheduler.sigmas[-1] == 0 and torch.isfinite(sample).all()
    torch.testing.assert_close(sample, expected)

    model.train()  # one training step: x_t = (1 - t) x_0 + t noise, target velocity noise - x_0
    data, noise = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    t = torch.rand(2, generator=generator)
    noisy = (1 - t)[:, None, None, None] * data + t[:, None, None, None] * noise
    loss = F.mse_loss(model(noisy, timestep=t * 1000, class_labels=labels).sample, noise - data)
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


# Runs in a fresh interpreter where `import hf_resdecay` fails: only the saved files provide the class.
WITHOUT_PACKAGE = textwrap.dedent(
    """
    import json
    import torch
    from diffusers import AutoModel, DiTPipeline
    from safetensors.torch import load_file, save_file

    checkpoint, pipeline_dir, inputs_path, outputs_path = sys.argv[1:5]
    inputs = load_file(inputs_path)
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    assert type(model).__name__ == "DiTDecayTransformer2DModel", type(model)
    assert not type(model).__module__.startswith("hf_resdecay"), type(model).__module__
    # a saved pipeline loads as remote code once model_index.json names the code file in transformer/
    index_path = pipeline_dir + "/model_index.json"
    index = json.load(open(index_path))
    index["transformer"] = ["dit_decay", "DiTDecayTransformer2DModel"]
    json.dump(index, open(index_path, "w"))
    pipeline = DiTPipeline.from_pretrained(pipeline_dir, trust_remote_code=True)
    with torch.no_grad():
        sample = model(**inputs).sample
        pipeline_sample = pipeline.transformer(**inputs).sample
    alphas = torch.tensor(model.shortcut_coefficients, dtype=torch.float64)
    outputs = {"sample": sample, "pipeline_sample": pipeline_sample, "alphas": alphas}
    save_file({name: tensor.contiguous() for name, tensor in outputs.items()}, outputs_path)
    """
)


def test_remote_code_without_the_package(tmp_path):
    pipeline = _pipeline()
    pipeline.save_pretrained(tmp_path / "pipeline")
    model = _transformer(shortcut_schedule="cosine")
    model.save_pretrained(tmp_path / "checkpoint")
    generator = torch.Generator().manual_seed(5)
    size = TINY["sample_size"]
    inputs = {
        "hidden_states": torch.randn(2, TINY["in_channels"], size, size, generator=generator),
        "timestep": torch.tensor([4, 900]),
        "class_labels": torch.tensor([0, 9]),
    }
    save_file(inputs, tmp_path / "inputs.safetensors")
    run_without_package(
        WITHOUT_PACKAGE,
        str(tmp_path / "checkpoint"),
        str(tmp_path / "pipeline"),
        str(tmp_path / "inputs.safetensors"),
        str(tmp_path / "out.safetensors"),
    )
    got = load_file(tmp_path / "out.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(got["sample"], model(**inputs).sample, atol=1e-6, rtol=0)
        expected = pipeline.transformer(**inputs).sample
        torch.testing.assert_close(got["pipeline_sample"], expected, atol=1e-6, rtol=0)
    assert got["alphas"].tolist() == model.shortcut_coefficients
