import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DModel
from torch import nn
from transformers import (
    DeiTConfig,
    DeiTModel,
    Dinov2Config,
    Dinov2Model,
    ResNetConfig,
    ResNetModel,
    ViTConfig,
    ViTForImageClassification,
    ViTMAEConfig,
    ViTMAEForPreTraining,
)

from hf_resdecay import ViTMAEDecayConfig, ViTMAEDecayForPreTraining, ViTMAEDecayModel
from hf_resdecay.alignment import ResidualBlock, capture_block_inputs, discover_residual_blocks

from .conftest import MAE_DECODER, VIT, randomize


def _replays(model, inputs, atol=1e-5):
    """Discover, capture, and check that ``branch(h) + alpha * h`` reproduces every captured block output."""
    found = discover_residual_blocks(model)
    captures = capture_block_inputs(model, found.blocks, inputs)
    assert [c.block.name for c in captures] == [b.name for b in found.blocks]
    for capture in captures:
        for sample in range(capture.input.shape[0]):
            h, args, kwargs = capture.sample(sample)
            branch = capture.block.branch(h, args, kwargs)
            if capture.block.kind != "resnet":
                expected = capture.output[sample : sample + 1]
                torch.testing.assert_close(
                    branch(h) + capture.block.alpha * h, expected, atol=atol, rtol=1e-4
                )
    return found, captures


def test_vit_classifier_blocks_are_found_in_the_base_model(pixel_values):
    model = randomize(ViTForImageClassification(ViTConfig(**VIT, num_labels=4)))
    found, captures = _replays(model, pixel_values)
    assert [b.name for b in found] == ["vit.layers.0", "vit.layers.1", "vit.layers.2"]
    assert {b.kind for b in found} == {"transformer"} and {b.alpha for b in found} == {1.0}
    assert captures[0].input.shape == (3, 17, 32)


@pytest.mark.parametrize(
    ("model_class", "config_class", "family"),
    [(DeiTModel, DeiTConfig, "DeiTLayer"), (Dinov2Model, Dinov2Config, "Dinov2Layer")],
)
def test_deit_and_dinov2_blocks(model_class, config_class, family, pixel_values):
    model = randomize(model_class(config_class(**VIT)))
    found, _ = _replays(model, pixel_values)
    assert len(found) == 3 and {b.family for b in found} == {family}


def test_vit_mae_is_read_unmasked_in_patch_order_and_decoder_blocks_are_left_out(pixel_values):
    model = randomize(ViTMAEForPreTraining(ViTMAEConfig(**VIT, **MAE_DECODER)))
    assert model.config.mask_ratio == 0.75
    found, captures = _replays(model, pixel_values)
    assert [b.name for b in found] == ["vit.layers.0", "vit.layers.1", "vit.layers.2"]
    assert model.config.mask_ratio == 0.75  # restored
    embeddings = model.vit.embeddings
    with torch.no_grad():
        patches = embeddings.patch_embeddings(pixel_values) + embeddings.position_embeddings[:, 1:]
    assert captures[0].input.shape == (3, 17, 32)  # all 16 patches and CLS: no masking
    torch.testing.assert_close(captures[0].input[:, 1:], patches)  # in patch order


def test_decayed_vit_mae_branch_subtracts_both_alphas(pixel_values):
    config = ViTMAEDecayConfig(**VIT, **MAE_DECODER, shortcut_decay=0.4, zero_init_residual_branches=False)
    model = randomize(ViTMAEDecayForPreTraining(config))
    found, captures = _replays(model, pixel_values)
    alphas = model.shortcut_coefficients
    assert [b.alpha for b in found] == pytest.approx(
        [alphas[0] * alphas[1], alphas[2] * alphas[3], alphas[4] * alphas[5]]
    )
    assert found[-1].alpha < 0.7
    layer = captures[1].block.module
    h, args, kwargs = captures[1].sample(0)
    a1, a2 = layer.attention_alpha, layer.mlp_alpha
    with torch.no_grad():
        attention = layer.attention(layer.layernorm_before(h))[0]
        middle = a1 * h + attention
        expected = a2 * attention + layer.mlp(layer.layernorm_after(middle))
        torch.testing.assert_close(
            captures[1].block.branch(h, args, kwargs)(h), expected, atol=1e-5, rtol=1e-5
        )


def test_decayed_vit_mae_zero_initialised_branches_are_zero(pixel_values):
    """With the recipe's zero init the block is exactly ``a1 * a2 * h``: the branch must vanish."""
    model = ViTMAEDecayModel(ViTMAEDecayConfig(**VIT, shortcut_decay=0.4)).eval()
    found = discover_residual_blocks(model)
    captures = capture_block_inputs(model, found.blocks, pixel_values)
    for capture in captures:
        h, args, kwargs = capture.sample(0)
        with torch.no_grad():
            branch = capture.block.branch(h, args, kwargs)(h)
            block_output = capture.block.module(h, *args, **kwargs)
        assert float(branch.abs().max()) < 1e-6 * float(h.abs().max())  # zero up to rounding
        if capture is not captures[0]:  # a plain "block(h) - h" would leave (a1 a2 - 1) h behind
            assert float((block_output - h).abs().max()) > 0.05 * float(h.abs().max())


def test_resnet_branch_includes_post_relu_derivative_and_projection_blocks_are_skipped(pixel_values):
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], layer_type="basic")
    model = randomize(ResNetModel(config), std=0.2)
    found, captures = _replays(model, pixel_values)
    assert [b.name for b in found] == [
        "encoder.stages.0.layers.0",
        "encoder.stages.0.layers.1",
        "encoder.stages.1.layers.1",
    ]
    assert [(s.name, "projection" in s.reason) for s in found.skipped] == [
        ("encoder.stages.1.layers.0", True)
    ]
    capture = captures[1]
    h, _, _ = capture.sample(2)
    module = capture.block.module
    with torch.no_grad():
        residual = module.layer(h)
        active = (residual + h) > 0
        # relu(F(h) + h) - h equals the branch only where the unit is active; elsewhere the branch is 0.
        torch.testing.assert_close(capture.block.branch(h)(h), torch.where(active, residual, 0.0))
        torch.testing.assert_close(
            torch.where(active, module(h) - h, 0.0), torch.where(active, residual, 0.0)
        )
    assert 0.05 < active.float().mean() < 0.95


def test_dit_conditioning_is_captured_and_replayed():
    model = randomize(
        DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            norm_num_groups=2,
        ),
        std=0.2,
    )
    inputs = {
        "hidden_states": torch.randn(2, 4, 8, 8),
        "timestep": torch.tensor([10, 500]),
        "class_labels": torch.tensor([1, 3]),
    }
    found, captures = _replays(model, inputs)
    assert [b.name for b in found] == ["transformer_blocks.0", "transformer_blocks.1"]
    h, args, kwargs = captures[0].sample(1)
    assert kwargs["timestep"].tolist() == [500] and kwargs["class_labels"].tolist() == [3]
    # The conditioning matters: replaying with the other sample's timestep changes the branch.
    other = dict(kwargs, timestep=torch.tensor([10]), class_labels=torch.tensor([1]))
    branch, other_branch = captures[0].block.branch(h, args, kwargs), captures[0].block.branch(h, args, other)
    assert not torch.allclose(branch(h), other_branch(h))


def test_unet_resnet_blocks_and_skipped_projection_blocks():
    model = randomize(
        UNet2DModel(
            sample_size=8,
            in_channels=3,
            out_channels=3,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
        ),
        std=0.2,
    )
    model.mid_block.resnets[0].output_scale_factor = 2.0
    found, captures = _replays(model, {"sample": torch.randn(2, 3, 8, 8), "timestep": torch.tensor([3, 7])})
    names = [b.name for b in found]
    assert names == ["down_blocks.0.resnets.0", "mid_block.resnets.0", "mid_block.resnets.1"]
    assert found[1].alpha == 0.5 and found[0].alpha == 1.0
    assert all("shortcut" in s.reason for s in found.skipped) and len(found.skipped) == 5
    assert captures[1].sample(0)[1][0].shape == (1, 4 * 8)  # temb (4 x first width) replayed, one sample


def test_user_blocks_and_alphas():
    blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
    model = nn.Sequential(*blocks)
    found = discover_residual_blocks(model, blocks=list(blocks), alphas=[1.0, 0.5, 0.0])
    assert [b.alpha for b in found] == [1.0, 0.5, 0.0] and [b.name for b in found] == ["0", "1", "2"]
    h = torch.randn(1, 4)
    torch.testing.assert_close(found[1].branch(h)(h), blocks[1](h) - 0.5 * h)
    torch.testing.assert_close(found[2].branch(h)(h), blocks[2](h))
    float64 = found[1].branch(h, dtype=torch.float64)(h.double())
    assert float64.dtype == torch.float64 and blocks[1].weight.dtype == torch.float32
    torch.testing.assert_close(float64.float(), blocks[1](h) - 0.5 * h)


def test_discovery_errors():
    with pytest.raises(ValueError, match="no residual block found"):
        discover_residual_blocks(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="alphas is only accepted together with blocks"):
        discover_residual_blocks(nn.Linear(2, 2), alphas=[1.0])
    with pytest.raises(ValueError, match=r"alphas must hold one value per block \(2\)"):
        discover_residual_blocks(nn.Linear(2, 2), blocks=[nn.Linear(2, 2), nn.Linear(2, 2)], alphas=[1.0])
    assert isinstance(ResidualBlock("b", nn.Identity()).alpha, float)
