import pytest
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, ViTMAEConfig

from hf_resdecay import ViTMAEDecayConfig

from .helpers import TINY


def test_defaults_are_the_released_recipe():
    config = ViTMAEDecayConfig()
    assert config.model_type == "vit_mae_decay"
    assert isinstance(config, ViTMAEConfig)
    assert config.shortcut_decay == 0.3
    assert config.shortcut_schedule == "linear"
    assert config.encoder_final_layernorm is False
    assert config.zero_init_residual_branches is True
    assert config.decoder_skip_connections is True


@pytest.mark.parametrize("decay", [-0.01, 1.0, 2])
def test_bad_decay_fails_at_construction(decay):
    with pytest.raises(ValueError, match=r"shortcut_decay must be in \[0, 1\)"):
        ViTMAEDecayConfig(shortcut_decay=decay)


@pytest.mark.parametrize("ratio", [1.5, 1.0, -0.5, float("nan")])
def test_mask_ratio_outside_zero_one_fails_at_construction(ratio):
    """1.5 used to mask like 0.5 and -0.5 to give a NaN loss."""
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\)"):
        ViTMAEDecayConfig(mask_ratio=ratio)


@pytest.mark.parametrize("ratio", [0.0, 0.75, 0.99])
def test_mask_ratio_inside_zero_one_is_accepted(ratio):
    assert ViTMAEDecayConfig(mask_ratio=ratio).mask_ratio == ratio


def test_bad_schedule_fails_at_construction():
    with pytest.raises(ValueError, match="shortcut_schedule must be one of"):
        ViTMAEDecayConfig(shortcut_schedule="step")


def test_wrong_flag_type_names_the_field():
    with pytest.raises(StrictDataclassError, match="decoder_skip_connections"):
        ViTMAEDecayConfig(decoder_skip_connections="yes")


def test_value_changed_after_construction_is_caught_by_validate(tmp_path):
    config = ViTMAEDecayConfig()
    config.shortcut_decay = 1.2
    with pytest.raises(StrictDataclassError, match="shortcut_decay must be in"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()
    config = ViTMAEDecayConfig()
    config.mask_ratio = 1.5
    with pytest.raises(StrictDataclassError, match=r"mask_ratio must be in \[0, 1\)"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_round_trip_through_auto_config(tmp_path):
    config = ViTMAEDecayConfig(
        **TINY, shortcut_decay=0.25, shortcut_schedule="cosine", encoder_final_layernorm=True
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is ViTMAEDecayConfig
    assert loaded.to_diff_dict() == config.to_diff_dict()
    assert AutoConfig.for_model("vit_mae_decay", shortcut_decay=0.1).shortcut_decay == 0.1


@pytest.mark.parametrize(
    ("depth", "decoder_depth", "flag", "expected"),
    [(12, 8, True, 6), (7, 8, True, 4), (12, 2, True, 2), (1, 1, True, 1), (12, 8, False, 0)],
)
def test_number_of_skips(depth, decoder_depth, flag, expected):
    config = ViTMAEDecayConfig(
        num_hidden_layers=depth, decoder_num_hidden_layers=decoder_depth, decoder_skip_connections=flag
    )
    assert config.num_decoder_skip_connections == expected


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"image_size": 30, "patch_size": 4}, r"image_size=30 must be divisible by patch_size=4"),
        (
            {"image_size": [32, 30], "patch_size": 8},
            r"image_size=\[32, 30\] must be divisible by patch_size=8",
        ),
        ({"patch_size": 0}, r"patch_size must be >= 1; got 0"),
        (
            {"hidden_size": 30, "num_attention_heads": 4},
            r"hidden_size=30 must be divisible by num_attention_heads=4",
        ),
        (
            {"decoder_hidden_size": 30, "decoder_num_attention_heads": 4},
            r"decoder_hidden_size=30 must be divisible by decoder_num_attention_heads=4",
        ),
    ],
)
def test_geometry_that_cannot_run_fails_at_construction(fields, message):
    """Upstream accepts these and crops the image silently or fails at the first forward pass."""
    ViTMAEConfig(**fields)
    with pytest.raises(ValueError, match=message):
        ViTMAEDecayConfig(**fields)


def test_geometry_changed_after_construction_is_caught_by_validate(tmp_path):
    config = ViTMAEDecayConfig(**TINY)
    config.num_attention_heads = 3
    with pytest.raises(
        StrictDataclassError, match="hidden_size=32 must be divisible by num_attention_heads=3"
    ):
        config.save_pretrained(tmp_path)
