"""``train_diffusion.py --vae``: a SiT-style class-conditional DiT on VAE latents, end to end, tiny models.

The VAE is a randomly initialised ``AutoencoderKL`` built from a config and saved to a folder (no download);
the data are scikit-learn's digits; the saved pipeline is scored by ``hf-resdecay evaluate --metrics fid``.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hf_resdecay.cli import main as cli_main
from hf_resdecay.pipelines import DiTDecayPipeline, load_pipeline

from ..training.vae_helpers import save_tiny_vae
from .launch import launch, run_in_process

DIT = ["--model", "dit", "--num_layers", "2", "--num_attention_heads", "2", "--attention_head_dim", "8"]
LATENT = ["--image_size", "16", "--patch_size", "2", "--objective", "flow", "--class_conditional"]
QUICK = [
    "--num_samples",
    "4",
    "--num_inference_steps",
    "2",
    "--num_train_timesteps",
    "50",
    "--sample_every",
    "0",
]
RUN = ["--max_train_samples", "64", "--per_device_train_batch_size", "16", "--max_train_steps", "4"]


@pytest.fixture(scope="module")
def digits_dir(digits_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    digits_dataset.save_to_disk(folder)
    return folder


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A tiny decayed MAE encoder and its processor: the feature space of the FD computed below."""
    from transformers import ViTImageProcessorPil

    from hf_resdecay import ViTMAEDecayConfig, ViTMAEDecayForPreTraining

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("encoder")
    config = ViTMAEDecayConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=16,
        patch_size=4, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=32, zero_init_residual_branches=False,
    )  # fmt: skip
    ViTMAEDecayForPreTraining(config).save_pretrained(folder)
    ViTImageProcessorPil(
        size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(folder)
    return folder


def _train(out, vae, data, *extra, env=None):
    args = [
        *DIT,
        *LATENT,
        *QUICK,
        *RUN,
        "--vae",
        str(vae),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(out),
    ]
    return launch("train_diffusion.py", [*args, "--seed", "1", *extra], env=env)


@pytest.mark.filterwarnings("ignore:.*covariance is singular:UserWarning")
def test_latent_dit_trains_caches_saves_a_guided_pipeline_and_scores_fid(
    digits_dir, encoder_dir, tmp_path, monkeypatch
):
    vae = save_tiny_vae(tmp_path / "vae")
    cache = {"HF_RESDECAY_CACHE": str(tmp_path / "cache")}
    cached = tmp_path / "cached"
    result = _train(cached, vae, digits_dir, "--cache_latents", "--guidance_scale", "2.0", env=cache)
    assert "encoding latents" in result.stderr and "final training loss" in result.stdout
    assert len(list((tmp_path / "cache" / "latents").glob("*.npy"))) == 1

    results = json.loads((cached / "results.json").read_text())
    assert results["latents"]["scaling_factor"] == 0.5 and results["latents"]["cached"] == {"reused": False}
    assert results["latents"]["image_size"] == 16 and results["guidance_scale"] == 2.0
    index = json.loads((cached / "model_index.json").read_text())
    assert index["_class_name"] == "DiTDecayPipeline" and index["guidance_scale"] == 2.0
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["id2label"]["3"] == "3"
    transformer = json.loads((cached / "transformer" / "config.json").read_text())
    assert (transformer["in_channels"], transformer["sample_size"]) == (4, 8)  # the VAE's latents
    assert transformer["num_embeds_ada_norm"] == 10
    assert (cached / "samples" / "final.png").is_file()

    pipeline = load_pipeline(cached)
    assert isinstance(pipeline, DiTDecayPipeline) and pipeline.vae is not None
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(class_labels=[0, 9], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 16, 16, 3) and images.min() >= 0 and images.max() <= 1

    # The same run encoding every batch on the device: the same flips and draws, so the same weights
    uncached = tmp_path / "uncached"
    _train(uncached, vae, digits_dir, "--guidance_scale", "2.0", env=cache)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    first, second = load_file(cached / weights), load_file(uncached / weights)
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, atol=1e-6, rtol=0, msg=name)
    assert json.loads((uncached / "results.json").read_text())["latents"]["cached"] is None

    # FID end to end (an encoder's feature space), through the public entry point, resumable
    from hf_resdecay.data import load_image_dataset, subset
    from hf_resdecay.evaluation.features import encoder_feature_fn
    from hf_resdecay.evaluation.fid import frechet_distance, generated_features, inception_features

    monkeypatch.setenv("HF_RESDECAY_CACHE", str(tmp_path / "cache"))
    output = tmp_path / "fid.json"
    command = ["evaluate", str(cached), "--metrics", "fid", "--dataset", str(digits_dir)]
    command += ["--fid-feature-model", str(encoder_dir), "--fid-samples", "6", "--batch-size", "4"]
    command += ["--num-inference-steps", "2", "--max-test-samples", "8", "--guidance-scale", "3"]
    assert cli_main([*command, "--seed", "5", "--output", str(output)]) == 0
    scored = json.loads(output.read_text())
    assert scored["fid"]["generated"] == 6 and scored["fid"]["guidance_scale"] == 3.0
    saved = list((tmp_path / "cache" / "fid_batches").glob("*/batch_*.npy"))
    assert len(saved) == 2  # two batches, saved for resuming

    feature_fn, size = encoder_feature_fn(str(encoder_dir))
    options = {"size": size, "progress": False}
    steps = {"num_inference_steps": 2}
    generated = generated_features(
        pipeline, 6, 4, 5, feature_fn, guidance_scale=3.0, pipeline_kwargs=steps, **options
    )
    reference = inception_features(
        subset(load_image_dataset(str(digits_dir), split="test"), 8), feature_fn=feature_fn, **options
    )
    assert scored["summary"]["fd"] == pytest.approx(frechet_distance(generated, reference), rel=1e-6)
    assert np.isfinite(scored["summary"]["fd"]) and scored["summary"]["fd"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "unet", "--vae", "x"], "--vae trains a DiT on latents: add --model dit"),
        (["--model", "dit", "--cache_latents"], "--cache_latents caches VAE latents: add --vae"),
        (["--model", "dit", "--label_dropout", "1.0"], "--label_dropout must be in [0, 1); got 1.0"),
        (["--model", "dit", "--guidance_scale", "-1"], "--guidance_scale must be >= 0 (1: no guidance)"),
        (["--model", "unet", "--class_conditional"], "--class_conditional needs --model dit"),
    ],
)
def test_bad_latent_arguments_stop_before_training(tmp_path, args, message):
    result = run_in_process(
        "train_diffusion.py", [*args, "--image_size", "16", "--output_dir", str(tmp_path / "b")]
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr
    assert not (tmp_path / "b").exists()
