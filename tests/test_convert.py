"""Checkpoint converters against independent re-implementations of the source models.

Each test builds a tiny model of ``tests/reference_models.py`` (the sources' key layout), randomises every
tensor (zero-initialised ones included, so every path carries signal), saves it as the original training
scripts do (``torch.save`` with an ``args`` Namespace), converts the file through the public entry points,
reloads the folder with ``from_pretrained`` and compares outputs in float64.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from hf_resdecay import DiTDecayTransformer2DModel, ViTMAEDecayForPreTraining, ViTMAEDecayModel
from hf_resdecay.cli import main
from hf_resdecay.convert import (
    convert_checkpoint,
    convert_decay_mae,
    convert_mae,
    convert_sit,
    load_checkpoint,
)

from .reference_models import PlainMAE, ReferenceSiT, ReleasedDecayMAE, linear_coefficients

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
HEADS = {"num_attention_heads": 2, "decoder_num_attention_heads": 2}


def _randomised(module: torch.nn.Module, seed: int, keep: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Every tensor of ``module`` drawn from ``N(0, 0.5^2)``, except those named in ``keep``."""
    generator = torch.Generator().manual_seed(seed)
    return {
        key: value.clone() if key in keep else 0.5 * torch.randn(value.shape, generator=generator)
        for key, value in module.state_dict().items()
    }


def _save_release(path: Path, state: dict, **arguments) -> Path:
    """A training checkpoint as the release scripts write it: weights, optimizer, scaler, args."""
    first = next(iter(state.values()))
    torch.save(
        {
            "model": state,
            "optimizer": {"state": {0: {"exp_avg": torch.zeros_like(first)}}, "param_groups": [{"lr": 1e-4}]},
            "scaler": {"scale": 65536.0, "growth_factor": 2.0},
            "epoch": 7,
            "args": argparse.Namespace(model="tiny", output_dir="out", **arguments),
        },
        path,
    )
    return path


def _inputs(channels: int = 3, size: int = 12, patches: int = 9, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, channels, size, size, generator=generator, dtype=torch.float64)
    return images, torch.rand(2, patches, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("decoder_depth", [1, 3], ids=["fewer-decoder-blocks-than-skips", "more"])
def test_decay_mae_matches_release(tmp_path, decoder_depth):
    reference = ReleasedDecayMAE(decoder_depth=decoder_depth, min_decay=0.7, norm_pix_loss=True)
    state = _randomised(reference, seed=0)
    source = _save_release(
        tmp_path / "checkpoint-799.pth", state, min_decay=0.7, mask_ratio=0.5, norm_pix_loss=True
    )

    report = convert_checkpoint(source, tmp_path / "converted", "decay-mae", **HEADS)
    model = ViTMAEDecayForPreTraining.from_pretrained(tmp_path / "converted").double().eval()
    reference.load_state_dict(state)
    reference.double().eval()

    config = model.config
    assert (config.mask_ratio, config.norm_pix_loss, config.layer_norm_eps) == (0.5, True, 1e-6)
    assert not config.encoder_final_layernorm and config.decoder_skip_connections
    assert model.shortcut_coefficients == pytest.approx(linear_coefficients(8, 0.7))
    dropped_skips = {key for key in report.dropped if key.startswith("skip.")}
    assert dropped_skips == (
        {f"skip.1.{name}" for name in ("mask_token", "fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias")}
        if decoder_depth == 1
        else set()
    )
    assert not report.fresh
    assert json.loads((tmp_path / "converted" / "conversion.json").read_text())["format"] == "decay-mae"

    images, noise = _inputs()
    with torch.no_grad():
        output = model(pixel_values=images, noise=noise)
        loss, pred, mask = reference(images, noise, mask_ratio=0.5)
    torch.testing.assert_close(output.mask.double(), mask)
    torch.testing.assert_close(output.logits, pred, **TOLERANCE)
    torch.testing.assert_close(output.loss, loss, **TOLERANCE)


def test_plain_mae_with_decoder_matches_reference(tmp_path):
    reference = PlainMAE()
    state = _randomised(reference, seed=2)
    torch.save({"model": state}, tmp_path / "mae_visualize_vit_tiny.pth")

    report = convert_checkpoint(tmp_path / "mae_visualize_vit_tiny.pth", tmp_path / "plain", "mae", **HEADS)
    model = ViTMAEDecayForPreTraining.from_pretrained(tmp_path / "plain").double().eval()
    reference.load_state_dict(state)
    reference.double().eval()

    config = model.config
    assert config.shortcut_decay == 0 and config.encoder_final_layernorm
    assert not config.decoder_skip_connections and not config.zero_init_residual_branches
    assert not report.dropped and not report.fresh

    images, noise = _inputs()
    with torch.no_grad():
        output = model(pixel_values=images, noise=noise)
        encoded = model.vit(pixel_values=images, noise=noise).last_hidden_state
        loss, pred, _ = reference(images, noise, mask_ratio=0.75)
        latent, _, _ = reference.forward_encoder(images, noise, mask_ratio=0.75)
    torch.testing.assert_close(encoded, latent, **TOLERANCE)
    torch.testing.assert_close(output.logits, pred, **TOLERANCE)
    torch.testing.assert_close(output.loss, loss, **TOLERANCE)


@pytest.mark.parametrize("shortcut_decay", [0.0, 0.3], ids=["plain", "retrofit"])
def test_mae_encoder_only_matches_reference(tmp_path, shortcut_decay):
    reference = PlainMAE(decoder=False)
    state = _randomised(reference, seed=3)
    torch.save({"model": state}, tmp_path / "mae_pretrain_vit_tiny.pth")

    convert_checkpoint(
        tmp_path / "mae_pretrain_vit_tiny.pth",
        tmp_path / "encoder",
        "mae",
        shortcut_decay=shortcut_decay,
        num_attention_heads=2,
    )
    model = ViTMAEDecayModel.from_pretrained(tmp_path / "encoder").double().eval()
    reference.load_state_dict(state)
    reference.set_encoder_coefficients(linear_coefficients(6, 1 - shortcut_decay))
    reference.double().eval()

    images, noise = _inputs()
    with torch.no_grad():
        encoded = model(pixel_values=images, noise=noise).last_hidden_state
        latent, _, _ = reference.forward_encoder(images, noise, mask_ratio=0.75)
    torch.testing.assert_close(encoded, latent, **TOLERANCE)


def test_mae_full_recipe_retrofit_reports_fresh_and_dropped():
    reference = PlainMAE()
    state = _randomised(reference, seed=4)
    model, report = convert_mae(state, shortcut_decay=0.3, full_recipe=True, **HEADS)
    reference.load_state_dict(state)
    reference.set_encoder_coefficients(linear_coefficients(6, 0.7))

    assert set(report.dropped) == {
        "norm.weight",
        "norm.bias",
        "mask_token",
        "decoder_embed.weight",
        "decoder_embed.bias",
    }
    assert {"decoder.decoder_cls_token", "decoder.decoder_embed.weight", "decoder.decoder_embed.bias"} <= set(
        report.fresh
    )
    assert {key for key in report.fresh if "skip_layers" in key} == {
        f"decoder.skip_layers.{i}.{name}"
        for i in range(2)
        for name in ("mask_token", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias")
    }
    assert model.decoder.skip_layers[0].proj_out.weight.abs().sum() == 0
    images, noise = _inputs(seed=5)
    with torch.no_grad():
        encoded = model.vit(pixel_values=images.float(), noise=noise).last_hidden_state
        latent, _, _ = reference.forward_encoder(images.float(), noise, mask_ratio=0.75, final_norm=False)
        assert torch.isfinite(model(pixel_values=images.float(), noise=noise).loss)
    torch.testing.assert_close(encoded, latent, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("keep_sigma", [False, True], ids=["release-output", "keep-sigma"])
def test_sit_matches_release(tmp_path, keep_sigma):
    reference = ReferenceSiT(min_sigma=0.8)
    ema = _randomised(reference, seed=6, keep=("pos_embed",))
    online = _randomised(reference, seed=7, keep=("pos_embed",))
    arguments = argparse.Namespace(model="SiT-tiny", min_sigma=0.8, num_classes=10, image_size=64)
    torch.save({"model": online, "ema": ema, "opt": {}, "args": arguments}, tmp_path / "0400000.pt")

    report = convert_checkpoint(
        tmp_path / "0400000.pt", tmp_path / "dit", "sit", num_attention_heads=2, keep_sigma=keep_sigma
    )
    model = DiTDecayTransformer2DModel.from_pretrained(tmp_path / "dit").double().eval()
    reference.load_state_dict(ema)
    reference.double().eval()

    assert model.shortcut_coefficients == pytest.approx(linear_coefficients(8, 0.8))
    assert "pos_embed" in report.verified
    assert ("final_layer.linear.weight[sigma]" in report.dropped) != keep_sigma
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    t = torch.rand(2, generator=generator, dtype=torch.float64)
    y = torch.tensor([3, 10])  # 10: the null class of classifier-free guidance
    with torch.no_grad():
        output = model(x, timestep=t, class_labels=y).sample
        expected = reference(x, t, y, all_channels=keep_sigma)
    assert output.shape == expected.shape == (2, 8 if keep_sigma else 4, 8, 8)
    torch.testing.assert_close(output, expected, **TOLERANCE)


def _trap(marker: str) -> None:
    Path(marker).write_text("code ran")


class _Trap:
    """Unpickling this would call ``_trap``: a stand-in for a malicious payload."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_trap, (self.marker,))


def test_loader_refuses_other_pickled_objects(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"model": {"w": torch.zeros(1)}, "args": _Trap(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refusing to load"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_loader_unwraps_and_strips_ddp_prefix(tmp_path):
    torch.save({"state_dict": {"module.a": torch.ones(1)}, "args": {"x": 1}}, tmp_path / "wrapped.pth")
    assert load_checkpoint(tmp_path / "wrapped.pth")[0].keys() == {"a"}
    torch.save({"a": torch.ones(1)}, tmp_path / "raw.pth")
    assert load_checkpoint(tmp_path / "raw.pth") == ({"a": torch.ones(1)}, {})


@pytest.fixture(scope="module")
def decay_mae_state():
    return _randomised(ReleasedDecayMAE(), seed=9)


def test_errors_name_the_tensor_or_field(decay_mae_state):
    def converts(state, **options):
        return convert_decay_mae(state, **({"min_decay": 0.7} | HEADS | options))

    wrong = dict(decay_mae_state, **{"blocks.2.mlp.fc1.weight": torch.zeros(33, 16)})
    with pytest.raises(ValueError, match=r"blocks\.2\.mlp\.fc1\.weight has shape \(33, 16\)"):
        converts(wrong)
    missing = {key: value for key, value in decay_mae_state.items() if key != "blocks.1.attn.proj.bias"}
    with pytest.raises(ValueError, match=r"lacks 'blocks\.1\.attn\.proj\.bias'"):
        converts(missing)
    with pytest.raises(ValueError, match=r"head\.weight"):
        converts(dict(decay_mae_state, **{"head.weight": torch.zeros(10, 16)}))
    with pytest.raises(ValueError, match="num_attention_heads cannot be read from the weights"):
        converts(decay_mae_state, num_attention_heads=None)
    with pytest.raises(
        ValueError, match="num_attention_heads must be a positive integer dividing the width 16"
    ):
        converts(decay_mae_state, num_attention_heads=3)
    with pytest.raises(ValueError, match=r"min_decay .* is not recorded"):
        convert_decay_mae(decay_mae_state, **HEADS)
    with pytest.raises(ValueError, match=r"min_decay must be a number in \(0, 1\]"):
        converts(decay_mae_state, min_decay=1.5)
    with pytest.raises(ValueError, match=r"not a sit checkpoint.*'decay-mae'"):
        convert_sit(decay_mae_state, min_sigma=0.8)
    with pytest.raises(ValueError, match="try format='decay-mae'"):
        convert_mae(decay_mae_state, **HEADS)


def test_sit_refuses_a_trained_position_table():
    reference = ReferenceSiT()
    state = _randomised(reference, seed=10, keep=("pos_embed",))
    state["pos_embed"] = state["pos_embed"] + 0.01
    with pytest.raises(ValueError, match="pos_embed is not the fixed 2-D sin-cos table"):
        convert_sit(state, min_sigma=0.8, num_attention_heads=2)


def test_cli_convert(tmp_path, capsys):
    reference = ReferenceSiT()
    torch.save(_randomised(reference, seed=11, keep=("pos_embed",)), tmp_path / "sit.pt")
    command = ["convert", str(tmp_path / "sit.pt"), str(tmp_path / "out"), "--format", "sit"]

    assert main([*command, "--min-decay", "0.8", "--num-attention-heads", "2"]) == 0
    printed = capsys.readouterr().out
    assert "target tensors mapped from" in printed and "final_layer.linear.weight[sigma]" in printed
    assert DiTDecayTransformer2DModel.from_pretrained(
        tmp_path / "out"
    ).config.shortcut_decay == pytest.approx(0.2)

    assert main([*command, "--min-decay", "0.8", "--num-attention-heads", "2"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*command, "--num-attention-heads", "2", "--overwrite"]) == 2
    assert "min_sigma" in capsys.readouterr().err
    assert main([*command, "--min-decay", "0.8", "--shortcut-decay", "0.3", "--overwrite"]) == 2
    assert "--shortcut-decay applies to --format mae" in capsys.readouterr().err
