import copy
import json

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

from hf_resdecay import UNet2DDecayModel, shortcut_coefficients
from hf_resdecay.models.unet_2d_decay import AttentionDecay, ResnetBlock2DDecay, residual_units

from .helpers import CONFIGS, TINY

_THREE_LEVELS = {
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
}


def _inputs(config: dict, batch_size: int = 2) -> dict:
    generator = torch.Generator().manual_seed(1)
    size = config["sample_size"]
    inputs = {
        "sample": torch.randn(batch_size, 3, size, size, generator=generator),
        "timestep": torch.tensor([3, 7][:batch_size]),
    }
    if config.get("num_class_embeds"):
        inputs["class_labels"] = torch.tensor([0, 2][:batch_size])
    return inputs


def _upstream_and_ours(config: dict, **decay) -> tuple[UNet2DModel, UNet2DDecayModel]:
    """A random upstream UNet and a decayed one holding the same weights (loaded strictly)."""
    torch.manual_seed(0)
    upstream = UNet2DModel(**config).eval()
    ours = UNet2DDecayModel(**config, **decay).eval()
    ours.load_state_dict(upstream.state_dict(), strict=True)
    return upstream, ours


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_zero_decay_matches_upstream(name):
    config = CONFIGS[name]
    upstream, ours = _upstream_and_ours(config, shortcut_decay=0.0)
    assert list(ours.state_dict()) == list(upstream.state_dict())
    inputs = _inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).sample, upstream(**inputs).sample, atol=1e-6, rtol=0)
        _, decayed = _upstream_and_ours(config, shortcut_decay=0.2)
        assert (decayed(**inputs).sample - upstream(**inputs).sample).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_coefficients_run_over_every_residual_unit_in_forward_order(name):
    config = CONFIGS[name]
    _, model = _upstream_and_ours(config, shortcut_decay=0.2)
    expected_units = [m for m in model.modules() if isinstance(m, (ResnetBlock2D, AttentionDecay))]
    assert not [m for m in model.modules() if type(m) is Attention and m.residual_connection]
    assert all(type(unit) in (ResnetBlock2DDecay, AttentionDecay) for unit in expected_units)
    coefficients = model.shortcut_coefficients
    assert coefficients == shortcut_coefficients(len(expected_units), 0.2)
    assert coefficients[0] == 1.0 and coefficients[-1] == pytest.approx(0.8)

    called = []
    handles = [
        unit.register_forward_pre_hook(lambda module, args: called.append(module)) for unit in expected_units
    ]
    with torch.no_grad():
        model(**_inputs(config, batch_size=1))
    for handle in handles:
        handle.remove()
    assert len(called) == len(expected_units) == len({id(unit) for unit in called})
    # the linear schedule is strictly decreasing, so this pins the forward order exactly
    assert [unit.shortcut_alpha for unit in called] == coefficients
    assert called == residual_units(model)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedules(schedule):
    model = UNet2DDecayModel(**TINY, shortcut_decay=0.3, shortcut_schedule=schedule)
    assert model.shortcut_coefficients == shortcut_coefficients(12, 0.3, schedule)
    assert model.config.shortcut_schedule == schedule


def test_decayed_units_compute_alpha_shortcut_plus_branch():
    """Against upstream's own forward: decayed = upstream - (1 - alpha) * shortcut / output_scale."""
    config = dict(TINY, mid_block_scale_factor=2.0)
    _, model = _upstream_and_ours(config, shortcut_decay=0.4)
    generator = torch.Generator().manual_seed(5)
    temb = torch.randn(2, 4 * 8, generator=generator)

    resnet = model.up_blocks[0].resnets[0]  # concatenated input: a 1x1 conv shortcut
    mid_resnet = model.mid_block.resnets[1]  # identity shortcut, output_scale_factor 2
    for unit in (resnet, mid_resnet):
        x = torch.randn(2, unit.in_channels, 4, 4, generator=generator)
        with torch.no_grad():
            shortcut = x if unit.conv_shortcut is None else unit.conv_shortcut(x)
            upstream = ResnetBlock2D.forward(unit, x, temb)
            expected = upstream - (1 - unit.shortcut_alpha) * shortcut / unit.output_scale_factor
            torch.testing.assert_close(unit(x, temb), expected, atol=1e-6, rtol=1e-6)
        assert unit.shortcut_alpha < 1

    attention = model.mid_block.attentions[0]
    assert attention.shortcut_rescale == 2.0 and attention.shortcut_alpha < 1
    plain = copy.deepcopy(attention)
    plain.__class__ = Attention
    plain.residual_connection, plain.rescale_output_factor = True, attention.shortcut_rescale
    x = torch.randn(2, 16, 4, 4, generator=generator)
    with torch.no_grad():
        expected = plain(x) - (1 - attention.shortcut_alpha) * x / attention.shortcut_rescale
        torch.testing.assert_close(attention(x), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("shortcut_decay", 1.0, r"shortcut_decay must be in \[0, 1\)"),
        ("shortcut_decay", -0.1, r"shortcut_decay must be in \[0, 1\)"),
        ("shortcut_decay", "0.2", r"shortcut_decay must be a real number in \[0, 1\)"),
        ("shortcut_schedule", "exp", "shortcut_schedule must be one of 'linear', 'cosine', 'constant'"),
    ],
)
def test_invalid_shortcut_settings_are_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        UNet2DDecayModel(**TINY, **{field: value})


def test_unknown_block_types_are_refused():
    config = dict(TINY, down_block_types=("DownEncoderBlock2D", "DownBlock2D"))
    with pytest.raises(NotImplementedError, match="DownEncoderBlock2D"):
        UNet2DDecayModel(**config)


def test_gradients_and_gradient_checkpointing():
    _, model = _upstream_and_ours(TINY, shortcut_decay=0.2)
    model.train()
    inputs = _inputs(TINY)
    resnets = [model.down_blocks[0].resnets[0], model.up_blocks[-1].resnets[-1]]
    assert all(isinstance(resnet, ResnetBlock2DDecay) for resnet in resnets)
    calls = [0, 0]
    for index, resnet in enumerate(resnets):
        resnet.conv1.register_forward_hook(
            lambda *args, index=index: calls.__setitem__(index, calls[index] + 1)
        )

    def output_and_gradients() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        output = model(**inputs).sample
        output.square().mean().backward()
        return output.detach(), {name: parameter.grad.clone() for name, parameter in model.named_parameters()}

    plain_output, plain = output_and_gradients()
    assert all(grad.abs().sum() > 0 for name, grad in plain.items() if "time_proj" not in name)
    assert calls == [1, 1]
    model.enable_gradient_checkpointing()
    checkpointed_output, checkpointed = output_and_gradients()
    assert calls == [3, 3]  # the decayed resnets ran again in backward: their activations were not kept
    torch.testing.assert_close(checkpointed_output, plain_output, atol=1e-6, rtol=0)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


_SHAPE = (
    r"\(batch, 3, height, width\) with height and width multiples of 2 "
    r"\(2 \*\* \(len\(block_out_channels\) - 1\)"
)


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        (torch.zeros(2, 1, 16, 16), rf"sample must have shape {_SHAPE}.*got \(2, 1, 16, 16\)"),
        (torch.zeros(2, 3, 16), rf"sample must have shape {_SHAPE}.*got \(2, 3, 16\)"),
        (torch.zeros(2, 3, 15, 16), rf"sample must have shape {_SHAPE}.*got \(2, 3, 15, 16\)"),
        (torch.zeros(0, 3, 16, 16), rf"at least one image, shape {_SHAPE}.*got \(0, 3, 16, 16\)"),
        (
            torch.zeros(2, 3, 16, 16, dtype=torch.float64),
            r"dtype torch.float32 \(the model's dtype\); got torch.float64",
        ),
        (
            torch.zeros(2, 3, 16, 16, dtype=torch.uint8),
            r"dtype torch.float32 \(the model's dtype\); got torch.uint8",
        ),
    ],
    ids=["channels", "ndim", "odd-height", "empty-batch", "float64", "uint8"],
)
def test_bad_samples_get_a_clear_error(sample, message):
    """These used to fail deep inside a convolution or a skip concatenation, if at all."""
    _, model = _upstream_and_ours(TINY)
    with pytest.raises(ValueError, match=message):
        model(sample, torch.tensor([3, 7][: max(len(sample), 1)]))


def test_samples_of_any_downsamplable_size_run():
    _, model = _upstream_and_ours(TINY)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 8, 24), 3).sample.shape == (1, 3, 8, 24)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"sample_size": 15},
            r"sample_size=15 must be divisible by 2 \(2 \*\* \(len\(block_out_channels\) - 1\)\)",
        ),
        (
            {"sample_size": (16, 18), "block_out_channels": (8, 16, 16)} | _THREE_LEVELS,
            r"sample_size=\(16, 18\) must be divisible by 4",
        ),
    ],
)
def test_sample_sizes_the_downsampling_cannot_take_are_rejected(fields, message):
    UNet2DModel(**{**TINY, **fields})  # upstream builds it, and fails at the first forward pass
    with pytest.raises(ValueError, match=message):
        UNet2DDecayModel(**{**TINY, **fields})


def test_save_and_load_round_trip(tmp_path):
    _, model = _upstream_and_ours(TINY, shortcut_decay=0.3, shortcut_schedule="cosine")
    model.save_pretrained(tmp_path)
    files = {path.name for path in tmp_path.iterdir()}
    assert files == {"config.json", "diffusion_pytorch_model.safetensors", "unet_2d_decay.py", "shortcut.py"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {"AutoModel": "unet_2d_decay.UNet2DDecayModel"}
    assert config["_class_name"] == "UNet2DDecayModel"
    assert (config["shortcut_decay"], config["shortcut_schedule"]) == (0.3, "cosine")

    loaded, info = UNet2DDecayModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == info["unexpected_keys"] == []
    assert "auto_map" not in loaded.config
    assert loaded.shortcut_coefficients == model.shortcut_coefficients
    inputs = _inputs(TINY)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).sample, model(**inputs).sample)
    loaded.save_pretrained(tmp_path / "again")  # no auto_map clash on a second save
    assert json.loads((tmp_path / "again" / "config.json").read_text())["auto_map"] == config["auto_map"]


def test_retrofit_a_stock_checkpoint(tmp_path):
    torch.manual_seed(2)
    stock = UNet2DModel(**TINY).eval()
    stock.save_pretrained(tmp_path)
    inputs = _inputs(TINY)

    model, info = UNet2DDecayModel.from_pretrained(tmp_path, shortcut_decay=0.25, output_loading_info=True)
    assert info["missing_keys"] == info["unexpected_keys"] == info["mismatched_keys"] == []
    assert model.config.shortcut_decay == 0.25 and model.shortcut_coefficients[-1] == pytest.approx(0.75)
    stock_weights = stock.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, stock_weights[name], rtol=0, atol=0, msg=name)
    with torch.no_grad():
        expected = stock(**inputs).sample
        assert (model(**inputs).sample - expected).abs().max() > 1e-3
        unchanged = UNet2DDecayModel.from_pretrained(tmp_path, shortcut_decay=0.0)
        torch.testing.assert_close(unchanged(**inputs).sample, expected, atol=1e-6, rtol=0)


def test_upstream_class_silently_drops_the_decay(tmp_path):
    upstream, ours = _upstream_and_ours(TINY, shortcut_decay=0.3)
    ours.save_pretrained(tmp_path)
    plain, info = UNet2DModel.from_pretrained(tmp_path, output_loading_info=True)
    assert type(plain) is UNet2DModel
    assert info["missing_keys"] == info["unexpected_keys"] == []
    inputs = _inputs(TINY)
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).sample, upstream(**inputs).sample, atol=1e-6, rtol=0)
        assert (plain(**inputs).sample - ours(**inputs).sample).abs().max() > 1e-3
