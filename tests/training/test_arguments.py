"""The scripts' argument parsing: flags that keep the config unless given, Literal choices, recipes,
``--config_overrides`` read as ``PretrainedConfig.update_from_string`` reads them, no abbreviations."""

import dataclasses
from typing import Literal

import pytest

from hf_resdecay import ViTMAEDecayConfig
from hf_resdecay.training import (
    CommonTrainingArguments,
    ScriptArgumentParser,
    check_choices,
    given_fields,
    parse_config_overrides,
)

from ..training_scripts.launch import load_script, run_in_process

MODEL_FLAGS = {  # every model flag of each script but the family choice
    "train_mae.py": [
        "shortcut_decay", "shortcut_schedule", "encoder_final_layernorm", "zero_init_residual_branches",
        "decoder_skip_connections", "image_size", "patch_size", "num_channels", "hidden_size",
        "num_hidden_layers", "num_attention_heads", "intermediate_size", "decoder_hidden_size",
        "decoder_num_hidden_layers", "decoder_num_attention_heads", "decoder_intermediate_size", "mask_ratio",
        "norm_pix_loss",
    ],
    "train_diffusion.py": [
        "shortcut_decay", "shortcut_schedule", "long_skip_connections", "image_size", "num_channels",
        "block_out_channels", "layers_per_block", "num_layers", "num_attention_heads", "attention_head_dim",
        "patch_size",
    ],
}  # fmt: skip


def _parse(script: str, argv: list[str]):
    """``(model_args, data_args, args)`` as ``training_scripts/<script>`` parses ``argv``."""
    return load_script(script).parse_arguments(["--output_dir", "out", *argv])


@pytest.mark.parametrize("script", sorted(MODEL_FLAGS))
def test_model_flags_not_given_keep_the_checkpoints_config(script):
    """From a checkpoint, every model flag not given stays None ("keep the config"): no script default and no
    default recipe overwrites the checkpoint's value."""
    model_args, _, args = _parse(script, ["--model_name_or_path", "some/checkpoint"])
    assert {name: getattr(model_args, name) for name in MODEL_FLAGS[script]} == dict.fromkeys(
        MODEL_FLAGS[script]
    )
    assert args.recipe is None
    assert given_fields(model_args, exclude=("model",)) == {"model_name_or_path": "some/checkpoint"}


@pytest.mark.parametrize(
    ("script", "flags", "expected"),
    [
        ("train_mae.py", ["--shortcut_decay", "0.5"], {"shortcut_decay": 0.5}),
        ("train_mae.py", ["--shortcut-decay", "0.5"], {"shortcut_decay": 0.5}),
        ("train_mae.py", ["--shortcut-decay=0.5", "--mask_ratio=0.6"], {"shortcut_decay": 0.5,
                                                                         "mask_ratio": 0.6}),
        ("train_mae.py", ["--shortcut_decay", "0.3"], {"shortcut_decay": 0.3}),  # the default, but given
        ("train_mae.py", ["--no_decoder_skip_connections"], {"decoder_skip_connections": False}),
        ("train_mae.py", ["--no-decoder-skip-connections"], {"decoder_skip_connections": False}),
        ("train_mae.py", ["--decoder-skip-connections", "false"], {"decoder_skip_connections": False}),
        ("train_mae.py", ["--encoder_final_layernorm"], {"encoder_final_layernorm": True}),
        ("train_mae.py", ["--shortcut_schedule", "cosine"], {"shortcut_schedule": "cosine"}),
        ("train_diffusion.py", ["--shortcut-decay", "0.1"], {"shortcut_decay": 0.1}),
        ("train_diffusion.py", ["--no-long-skip-connections"], {"long_skip_connections": False}),
        ("train_diffusion.py", ["--long_skip_connections=false"], {"long_skip_connections": False}),
        ("train_diffusion.py", ["--long_skip_connections"], {"long_skip_connections": True}),
    ],
)  # fmt: skip
def test_every_spelling_of_a_model_flag_is_seen_as_given(script, flags, expected):
    """Hyphenated spellings, ``--x=value``, ``--no_x`` and a bare ``--x`` set the field; others stay None."""
    model_args, _, _ = _parse(script, ["--model_name_or_path", "ckpt", *flags])
    exclude = ("model", "model_name_or_path")
    assert given_fields(model_args, exclude=exclude) == expected


@pytest.mark.parametrize("script", sorted(MODEL_FLAGS))
def test_an_abbreviated_flag_is_refused_not_ignored(script, tmp_path):
    """``--shortcut_d 0.4`` used to be parsed, then silently dropped when starting from a checkpoint: the
    scripts now refuse it before anything runs (a flag added later cannot change what it means either)."""
    args = ["--output_dir", str(tmp_path / "out"), "--model_name_or_path", "ckpt", "--shortcut_d", "0.4"]
    result = run_in_process(script, args)
    assert result.returncode == 2
    assert "error: unrecognized arguments: --shortcut_d 0.4 (flags are written in full" in result.stderr
    assert not (tmp_path / "out").exists()


def _script_parser(script: str) -> ScriptArgumentParser:
    module = load_script(script)
    return ScriptArgumentParser((module.ModelArguments, module.DataArguments, module.TrainingArguments))


def test_choices_are_literal_types_that_argparse_shows_and_checks(capsys):
    parser = _script_parser("train_diffusion.py")
    help_text = " ".join(parser.format_help().split())
    for shown in (
        "--model {unet,dit}",
        "--objective {ddpm,flow}",
        "--shortcut_schedule {linear,cosine,constant}",
    ):
        assert shown in help_text
    assert "--mixed_precision {no,fp16,bf16}" in help_text and "--hub_strategy {end,checkpoint}" in help_text
    with pytest.raises(SystemExit) as stopped:
        parser.parse(["--output_dir", "out", "--shortcut_schedule", "step"])
    assert stopped.value.code == 2
    assert (
        "argument --shortcut_schedule/--shortcut-schedule: invalid choice: 'step'" in capsys.readouterr().err
    )


def test_check_choices_covers_dataclasses_built_in_code():
    @dataclasses.dataclass
    class Options:
        kind: Literal["a", "b"] = "a"
        maybe: Literal["x", "y"] | None = None
        free: str = "anything"

    check_choices(Options())
    check_choices(Options(kind="b", maybe="y"))
    with pytest.raises(ValueError, match=r"--maybe must be one of x, y; got 'z'"):
        check_choices(Options(maybe="z"))
    with pytest.raises(
        ValueError, match=r"--report_to must be one of none, tensorboard, wandb; got 'mlflow'"
    ):
        CommonTrainingArguments(output_dir="x", report_to="mlflow").check()


@pytest.mark.parametrize(
    "text",
    [
        "hidden_size=256,mask_ratio=0.6",
        "qkv_bias=false,initializer=transformers",
        " norm_pix_loss=1 , image_size=32 ",
    ],
)
def test_config_overrides_read_as_update_from_string_reads_them(text):
    """Values get the types ``PretrainedConfig.update_from_string`` gives them, on a copy of the config."""
    config = ViTMAEDecayConfig(hidden_size=64, num_attention_heads=4)
    overrides = parse_config_overrides(config, text)
    reference = ViTMAEDecayConfig(hidden_size=64, num_attention_heads=4)
    reference.update_from_string(",".join(item.strip() for item in text.split(",")))
    assert overrides == {key: getattr(reference, key) for key in overrides}
    assert {type(value) for value in overrides.values()} <= {int, float, bool, str}
    assert config.hidden_size == 64  # left unchanged


def test_config_overrides_of_a_diffusers_config_dict():
    config = {
        "sample_size": 32,
        "shortcut_decay": 0.2,
        "norm_type": "ada_norm_zero",
        "block_out_channels": (8,),
    }
    assert parse_config_overrides(config, "sample_size=16,shortcut_decay=0.1") == {
        "sample_size": 16,
        "shortcut_decay": 0.1,
    }
    assert parse_config_overrides(config, None) == {} and parse_config_overrides(config, " , ") == {}
    for text, message in [
        ("sample_size", r"--config_overrides: expected key=value, got 'sample_size'"),
        ("a=b=c", r"--config_overrides: expected key=value, got 'a=b=c'"),
        ("sample_sise=16", r"--config_overrides: key sample_sise isn't in the original config dict"),
        ("sample_size=large", r"--config_overrides: invalid literal for int\(\) with base 10: 'large'"),
        (
            "block_out_channels=8",
            r"--config_overrides: You can only update int, float, bool or string values",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_config_overrides(config, text)


def test_recipe_values_are_flags_the_command_line_overrides(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "# a comment\nhidden_size: 64\nnum_attention_heads: 4\nshortcut_decay: 0.4\n"
        "decoder_skip_connections: false\nbase_learning_rate: 1.5e-4\nmax_train_steps: null\nhflip: false\n"
    )
    model_args, data_args, args = _parse("train_mae.py", ["--recipe", str(recipe), "--shortcut_decay", "0.2"])
    assert (model_args.hidden_size, model_args.num_attention_heads, model_args.shortcut_decay) == (64, 4, 0.2)
    assert model_args.decoder_skip_connections is False and data_args.hflip is False
    assert args.base_learning_rate == 1.5e-4 and args.max_train_steps is None and args.recipe == str(recipe)
    assert model_args.image_size is None  # a recipe replaces the default recipe: the config's default then
    model_args, _, _ = _parse("train_mae.py", ["--recipe", str(recipe), "--decoder_skip_connections"])
    assert model_args.decoder_skip_connections is True


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "hiden_size: 64\n",
            r"unknown key 'hiden_size' \(did you mean hidden_size\?\); every key must be a flag",
        ),
        ("recipe: other.yaml\n", r"unknown key 'recipe'"),
        (
            "hidden_size: [64, 128]\n",
            r"hidden_size must be one number, string or true/false; got \[64, 128\]",
        ),
        ("- hidden_size\n", r"expected 'flag: value' lines, got list"),
        ("hidden_size: [64\n", r"not valid YAML"),
    ],
)
def test_bad_recipes_are_named(tmp_path, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(ValueError, match=rf"--recipe {recipe}: {message}"):
        _script_parser("train_mae.py").parse(["--output_dir", "out", "--recipe", str(recipe)])
    with pytest.raises(ValueError, match=r"--recipe .*missing\.yaml: no such file"):
        _script_parser("train_mae.py").parse(
            ["--output_dir", "out", "--recipe", str(tmp_path / "missing.yaml")]
        )


def test_a_bad_recipe_value_is_checked_like_a_flag(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("shortcut_schedule: step\n")
    with pytest.raises(SystemExit):
        _script_parser("train_mae.py").parse(["--output_dir", "out", "--recipe", str(recipe)])
    assert "invalid choice: 'step'" in capsys.readouterr().err
