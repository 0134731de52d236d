"""Training objectives and sampler against an oracle denoiser that knows the data is a single image.

For data = one image ``x*``, the exact noise / velocity predictions are known in closed form, so a correct
loss is zero on them and a correct sampler lands on ``x*``: this pins the timestep and sign conventions.
"""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel, UNet2DModel

from hf_resdecay.sampling import diffusion_loss, image_grid, make_scheduler, sample_images

TARGET = torch.linspace(-0.9, 0.9, 2 * 8 * 8).reshape(1, 2, 8, 8)


class Oracle(torch.nn.Module):
    """The ideal denoiser for the one-image dataset TARGET, for the flow or the DDPM objective."""

    def __init__(self, objective: str, alphas_cumprod: torch.Tensor | None = None):
        super().__init__()
        self.objective, self.alphas_cumprod = objective, alphas_cumprod
        self.config = SimpleNamespace(sample_size=8, in_channels=2, num_embeds_ada_norm=None)
        self.weight = torch.nn.Parameter(torch.zeros(()))  # sampler reads device and dtype from parameters

    def forward(self, sample, timestep):
        shape = (-1, 1, 1, 1)
        if self.objective == "flow":
            t = (timestep.float() / 1000).view(shape)
            return SimpleNamespace(sample=(sample - TARGET) / t)
        alpha_bar = self.alphas_cumprod[timestep.long()].view(shape)
        return SimpleNamespace(sample=(sample - alpha_bar.sqrt() * TARGET) / (1 - alpha_bar).sqrt())


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_losses_vanish_on_the_oracle(objective):
    scheduler = make_scheduler(objective)
    oracle = Oracle(objective, getattr(scheduler, "alphas_cumprod", None))
    clean = TARGET.expand(6, -1, -1, -1)
    loss = diffusion_loss(oracle, scheduler, clean, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8
    assert (
        diffusion_loss(Oracle(objective, getattr(scheduler, "alphas_cumprod", None)), scheduler, -clean) > 0.1
    )


def test_flow_sampler_lands_on_the_data():
    images = sample_images(Oracle("flow"), make_scheduler("flow"), 3, num_inference_steps=10)
    torch.testing.assert_close(images, (TARGET.expand(3, -1, -1, -1) + 1) / 2, atol=1e-4, rtol=0)


def test_ddim_sampler_lands_on_the_data():
    scheduler = DDIMScheduler.from_config(make_scheduler("ddpm").config)
    oracle = Oracle("ddpm", scheduler.alphas_cumprod)
    images = sample_images(oracle, scheduler, 2, num_inference_steps=20)
    torch.testing.assert_close(images, (TARGET.expand(2, -1, -1, -1) + 1) / 2, atol=1e-3, rtol=0)


def test_real_models_train_and_sample_deterministically():
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )  # fmt: skip
    dit = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, num_layers=2, sample_size=8, patch_size=2,
        num_embeds_ada_norm=3,
    )  # fmt: skip
    clean = torch.rand(4, 1, 8, 8) * 2 - 1
    for model, labels in ((unet, None), (dit, torch.tensor([0, 1, 2, 1]))):
        for objective in ("ddpm", "flow"):
            scheduler = make_scheduler(objective)
            loss = diffusion_loss(model, scheduler, clean, labels, torch.Generator().manual_seed(0))
            loss.backward()
            assert torch.isfinite(loss) and loss > 0
            draws = [
                sample_images(model, scheduler, 4, 3, labels, torch.Generator().manual_seed(1))
                for _ in range(2)
            ]
            assert draws[0].shape == (4, 1, 8, 8) and torch.equal(draws[0], draws[1])
            assert draws[0].min() >= 0 and draws[0].max() <= 1


def test_bad_arguments_and_grid():
    with pytest.raises(ValueError, match="objective must be one of ddpm, flow; got 'edm'"):
        make_scheduler("edm")
    with pytest.raises(ValueError, match=r"class_labels must have shape \(2,\)"):
        sample_images(Oracle("flow"), make_scheduler("flow"), 2, 2, class_labels=torch.tensor([1]))
    grid = image_grid(torch.rand(6, 3, 8, 8))
    assert grid.size == (24, 16) and grid.mode == "RGB"
    assert image_grid(torch.rand(4, 1, 8, 8)).mode == "L"


def _guided_dit():
    from hf_resdecay import DiTDecayTransformer2DModel

    torch.manual_seed(0)
    dit = DiTDecayTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=8, patch_size=2,
        num_embeds_ada_norm=3,
    )  # fmt: skip
    for block in dit.transformer_blocks:  # non-zero adaLN so that labels change the prediction
        torch.nn.init.normal_(block.norm1.linear.weight, std=0.3)
    torch.nn.init.normal_(dit.proj_out_2.weight, std=0.3)
    return dit.eval()


def test_guidance_scale_one_is_the_conditional_prediction_and_others_mix_with_the_null_class():
    from hf_resdecay.sampling import denoise, guided_prediction, null_class_label

    dit = _guided_dit()
    sample, timestep, labels = (
        torch.randn(3, 4, 8, 8),
        torch.tensor([10.0, 500.0, 900.0]),
        torch.tensor([0, 1, 2]),
    )
    with torch.no_grad():
        conditional = denoise(dit, sample, timestep, labels)
        unconditional = denoise(dit, sample, timestep, torch.full((3,), 3))
        assert null_class_label(dit) == 3  # the row after the 3 classes
        assert torch.equal(guided_prediction(dit, sample, timestep, labels, 1.0), conditional)
        guided = guided_prediction(dit, sample, timestep, labels, 4.0)
    assert not torch.allclose(conditional, unconditional, atol=1e-3)
    torch.testing.assert_close(
        guided, unconditional + 4.0 * (conditional - unconditional), atol=1e-5, rtol=1e-5
    )
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )  # fmt: skip
    with pytest.raises(ValueError, match="classifier-free guidance needs a class-conditional DiT"):
        guided_prediction(unet, torch.randn(1, 1, 8, 8), torch.tensor([1]), None, 2.0)


def test_label_dropout_replaces_labels_by_the_null_class_once_per_sample():
    """The DiT sees the labels the objective passes (it drops none itself, in any block)."""
    dit = _guided_dit().train()
    seen = []
    for block in dit.transformer_blocks:
        block.norm1.emb.class_embedder.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    labels = torch.arange(400) % 3
    clean = torch.randn(400, 4, 8, 8)
    diffusion_loss(
        dit, make_scheduler("flow"), clean, labels, torch.Generator().manual_seed(0), label_dropout=0.25
    )
    first = seen[0]
    assert all(torch.equal(first, other) for other in seen[1:])  # one decision for the whole stack
    dropped = first == 3
    assert 60 < int(dropped.sum()) < 140 and torch.equal(first[~dropped], labels[~dropped])  # ~100 of 400
    seen.clear()
    diffusion_loss(dit, make_scheduler("flow"), clean, labels, torch.Generator().manual_seed(0))
    assert torch.equal(seen[0], labels)  # no dropout: labels as given, even in training mode
    with pytest.raises(ValueError, match=r"label_dropout must be in \[0, 1\); got 1.0"):
        diffusion_loss(dit, make_scheduler("flow"), clean, labels, label_dropout=1.0)


def test_dit_pipeline_samples_guided_batches_and_round_trips(tmp_path):
    from hf_resdecay.pipelines import DiTDecayPipeline

    pipeline = DiTDecayPipeline(_guided_dit(), make_scheduler("flow", 20), guidance_scale=2.5)
    pipeline.set_progress_bar_config(disable=True)
    run = {"num_inference_steps": 2, "output_type": "latent"}
    latents = pipeline(class_labels=[2, 0], generator=torch.Generator().manual_seed(0), **run).images
    assert latents.shape == (2, 4, 8, 8)
    explicit = pipeline([2, 0], guidance_scale=2.5, generator=torch.Generator().manual_seed(0), **run).images
    assert torch.equal(latents, explicit)  # the saved default is used
    unguided = pipeline([2, 0], guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **run).images
    assert not torch.allclose(latents, unguided)
    pixels = pipeline(batch_size=5, num_inference_steps=2, output_type="pt").images  # classes 0, 1, 2, 0, 1
    assert pixels.shape == (5, 4, 8, 8) and pixels.min() >= 0 and pixels.max() <= 1

    pipeline.save_pretrained(tmp_path)
    loaded = DiTDecayPipeline.from_pretrained(tmp_path)
    assert loaded.vae is None and loaded.config.guidance_scale == 2.5
    loaded.set_progress_bar_config(disable=True)
    again = loaded([2, 0], generator=torch.Generator().manual_seed(0), **run).images
    torch.testing.assert_close(again, latents, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 3\); got values from 0 to 3"):
        pipeline([0, 3], **run)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        pipeline([0], guidance_scale=-1.0, **run)
