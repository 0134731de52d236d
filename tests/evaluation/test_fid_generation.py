"""Batched, per-batch-seeded FID generation: DiT labels spread over the classes, guidance, resumption."""

import json
import logging

import numpy as np
import pytest
import torch

from hf_resdecay import DiTDecayTransformer2DModel
from hf_resdecay.evaluation.fid import (
    batch_generator,
    fid_for_pipeline,
    frechet_distance,
    generated_features,
    inception_features,
    spread_class_labels,
)
from hf_resdecay.pipelines import DiTDecayPipeline
from hf_resdecay.sampling import make_scheduler

singular_ok = pytest.mark.filterwarnings("ignore:.*covariance is singular:UserWarning")
FEATURES = {"size": None, "progress": False}


def channel_stats(pixels: torch.Tensor) -> torch.Tensor:
    """A cheap feature function: per-channel mean and standard deviation (6-d)."""
    return torch.cat([pixels.mean(dim=(2, 3)), pixels.std(dim=(2, 3))], dim=1)


@pytest.fixture
def tiny_dit_pipeline():
    """An untrained pixel-space class-conditional DiT (5 classes, 8 px, flow scheduler)."""
    torch.manual_seed(0)
    transformer = DiTDecayTransformer2DModel(
        sample_size=8,
        in_channels=3,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        patch_size=2,
        num_embeds_ada_norm=5,
    )
    for block in transformer.transformer_blocks:  # non-zero adaLN: labels and guidance change the output
        torch.nn.init.normal_(block.norm1.linear.weight, std=0.2)
    torch.nn.init.normal_(transformer.proj_out_2.weight, std=0.2)
    pipeline = DiTDecayPipeline(transformer, make_scheduler("flow", 20), guidance_scale=1.5)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_labels_are_spread_evenly_and_batches_have_their_own_generators():
    labels = torch.cat([spread_class_labels(start, 4, 3) for start in range(0, 12, 4)])
    assert labels.tolist() == [0, 1, 2] * 4
    assert np.bincount(spread_class_labels(0, 1000, 7).numpy()).tolist() == [143] * 6 + [142]
    first = torch.randn(4, generator=batch_generator(0, 0))
    assert torch.equal(first, torch.randn(4, generator=batch_generator(0, 0)))
    assert not torch.equal(first, torch.randn(4, generator=batch_generator(0, 1)))
    assert not torch.equal(first, torch.randn(4, generator=batch_generator(1, 0)))
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        spread_class_labels(0, 3, 0)


def test_dit_batches_get_spread_labels_and_the_guidance_scale(tiny_dit_pipeline):
    """The features equal those of images drawn by hand with the labels and generator of each batch."""
    options = {"num_inference_steps": 2}
    features = generated_features(
        tiny_dit_pipeline, 7, 3, 11, channel_stats, guidance_scale=3.0, pipeline_kwargs=options, **FEATURES
    )
    by_hand = []
    for batch, start in enumerate(range(0, 7, 3)):
        count = min(3, 7 - start)
        images = tiny_dit_pipeline(
            class_labels=[(start + i) % 5 for i in range(count)],
            generator=batch_generator(11, batch),
            guidance_scale=3.0,
            output_type="np",
            **options,
        ).images
        images = torch.from_numpy(images).permute(0, 3, 1, 2)  # diffusers "np" is channels-last
        by_hand.append(inception_features(images, feature_fn=channel_stats, **FEATURES))
    np.testing.assert_array_equal(features, np.concatenate(by_hand))
    default = generated_features(
        tiny_dit_pipeline, 7, 3, 11, channel_stats, pipeline_kwargs=options, **FEATURES
    )  # the pipeline's saved guidance scale, 1.5
    assert not np.allclose(default, features)


def test_guidance_needs_a_class_conditional_pipeline(tiny_ddpm):
    with pytest.raises(ValueError, match=r"guidance_scale 2\.0 needs a class-conditional pipeline"):
        generated_features(tiny_ddpm, 4, 2, 0, channel_stats, guidance_scale=2.0, **FEATURES)
    with pytest.raises(ValueError, match="need seed="):
        fid_for_pipeline(tiny_ddpm, np.zeros((4, 8, 8)), 4, guidance_scale=2.0, feature_fn=channel_stats)


class Interrupted(Exception):
    """Stands for a kill: raised by the feature function once a number of batches are done."""


def _stopping_after(batches: int):
    calls = []

    def features(pixels):
        if len(calls) == batches:
            raise Interrupted
        calls.append(len(pixels))
        return channel_stats(pixels)

    return features, calls


@pytest.mark.parametrize("which", ["unet", "dit"])
def test_interrupted_run_resumes_to_the_features_of_an_uninterrupted_one(
    which, tiny_ddpm, tiny_dit_pipeline, tmp_path, caplog
):
    pipeline = tiny_ddpm if which == "unet" else tiny_dit_pipeline
    run = {"pipeline_kwargs": {"num_inference_steps": 2}, "resume_key": {"fn": "channel_stats"}, **FEATURES}
    straight = generated_features(pipeline, 9, 2, 5, channel_stats, **{**run, "resume_key": None})

    stopping, calls = _stopping_after(2)
    with pytest.raises(Interrupted):
        generated_features(pipeline, 9, 2, 5, stopping, resume_dir=tmp_path, **run)
    (entry,) = tmp_path.iterdir()
    assert sorted(path.name for path in entry.glob("batch_*.npy")) == ["batch_000000.npy", "batch_000001.npy"]

    counting, calls = _stopping_after(99)
    resumed = generated_features(pipeline, 9, 2, 5, counting, resume_dir=tmp_path, **run)
    assert calls == [2, 2, 1]  # only batches 2, 3 and 4 were generated
    np.testing.assert_array_equal(resumed, straight)

    manifest = json.loads((entry / "manifest.json").read_text())
    assert sorted(manifest["batches"], key=int) == ["0", "1", "2", "3", "4"]
    damaged = entry / "batch_000003.npy"
    damaged.write_bytes(damaged.read_bytes()[:-8] + b"\0" * 8)  # same size, other bytes
    counting, calls = _stopping_after(99)
    with caplog.at_level(logging.WARNING):
        again = generated_features(pipeline, 9, 2, 5, counting, resume_dir=tmp_path, **run)
    assert calls == [2] and "batch_000003.npy are unusable" in caplog.text
    np.testing.assert_array_equal(again, straight)

    other_seed = generated_features(pipeline, 9, 2, 6, channel_stats, resume_dir=tmp_path, **run)
    assert len(list(tmp_path.iterdir())) == 2 and not np.array_equal(other_seed, straight)  # its own entry


@singular_ok
def test_fid_for_pipeline_with_seed_resumes_and_matches_the_features(tiny_dit_pipeline, tmp_path):
    reference = np.random.default_rng(0).random((6, 3, 8, 8), dtype=np.float32)
    common = {"feature_fn": channel_stats, "pipeline_kwargs": {"num_inference_steps": 2}, **FEATURES}
    value = fid_for_pipeline(
        tiny_dit_pipeline,
        reference,
        6,
        batch_size=4,
        seed=2,
        guidance_scale=2.0,
        device="cpu",
        resume_dir=tmp_path,
        feature_key="channel_stats",
        **common,
    )
    steps = {"num_inference_steps": 2}
    features = generated_features(
        tiny_dit_pipeline, 6, 4, 2, channel_stats, guidance_scale=2.0, pipeline_kwargs=steps, **FEATURES
    )
    expected = frechet_distance(features, inception_features(reference, feature_fn=channel_stats, **FEATURES))
    assert value == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="feature_key naming it"):
        fid_for_pipeline(tiny_dit_pipeline, reference, 6, seed=2, resume_dir=tmp_path, **common)
    with pytest.raises(ValueError, match="either generator"):
        fid_for_pipeline(tiny_dit_pipeline, reference, 6, seed=2, generator=torch.Generator(), **common)
