"""``training_scripts/recipes/*.yaml``: the paper's settings as argument files; what a bare command does."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from hf_resdecay import ViTMAEDecayConfig, alpha_eff, shortcut_coefficients
from hf_resdecay.training import ScriptArgumentParser, given_fields

from .launch import SCRIPTS, launch, load_script, run_in_process

RECIPES = sorted((SCRIPTS / "recipes").glob("*.yaml"))
TINY_MAE = [
    "--image_size", "16", "--patch_size", "4", "--hidden_size", "32", "--num_hidden_layers", "2",
    "--num_attention_heads", "2", "--intermediate_size", "64", "--decoder_hidden_size", "16",
    "--decoder_num_hidden_layers", "1", "--decoder_num_attention_heads", "2",
    "--decoder_intermediate_size", "32",
]  # fmt: skip


def _script_for(recipe: Path) -> str:
    return "train_mae.py" if recipe.name.startswith("mae_") else "train_diffusion.py"


def _values(recipe: Path) -> dict:
    return yaml.safe_load(recipe.read_text())


def test_the_recipes_are_there():
    names = {recipe.stem for recipe in RECIPES}
    assert {
        "mae_cpu_default",
        "diffusion_cpu_default",
        "mae_vit_base_in1k",
        "mae_vit_base_in1k_plain",
    } <= names
    assert {"mae_vit_large_in1k", "mae_vit_small_1gpu", "sit_b2_in1k_256", "sit_xl2_in1k_256"} <= names
    assert {"sit_b2_in1k_256_plain", "sit_xl2_in1k_256_plain"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_every_key_is_a_flag_of_its_script_and_parses_to_its_value(recipe):
    script = load_script(_script_for(recipe))
    parser = ScriptArgumentParser((script.ModelArguments, script.DataArguments, script.TrainingArguments))
    values = _values(recipe)
    assert set(values) - parser.flag_names() == set(), f"{recipe.name}: not flags of {_script_for(recipe)}"
    parsed = script.parse_arguments(["--output_dir", "out", "--recipe", str(recipe)])
    fields = {key: value for instance in parsed for key, value in vars(instance).items()}
    assert {key: fields[key] for key in values} == values
    assert fields["recipe"] == str(recipe)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_every_recipe_says_what_the_paper_reports_and_how_long_it_took(recipe):
    comments = " ".join(line for line in recipe.read_text().splitlines() if line.startswith("#"))
    assert "Paper" in comments and "Time" in comments


def _mae_config(recipe: Path) -> ViTMAEDecayConfig:
    model_args, _, _ = load_script("train_mae.py").parse_arguments(
        ["--output_dir", "o", "--recipe", str(recipe)]
    )
    return ViTMAEDecayConfig(**given_fields(model_args, exclude=("model_name_or_path", "config_overrides")))


def test_the_vit_b_recipes_are_the_papers_model_and_its_plain_twin():
    decayed = _mae_config(SCRIPTS / "recipes" / "mae_vit_base_in1k.yaml")
    plain = _mae_config(SCRIPTS / "recipes" / "mae_vit_base_in1k_plain.yaml")
    sizes = ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    assert [getattr(decayed, name) for name in sizes] == [224, 16, 768, 12, 12]  # ViT-B/16
    coefficients = shortcut_coefficients(2 * decayed.num_hidden_layers, decayed.shortcut_decay)
    assert coefficients[0] == 1.0 and coefficients[-1] == pytest.approx(0.7)  # alpha_min 0.7, as released
    differ = {key for key, value in decayed.to_dict().items() if plain.to_dict()[key] != value}
    assert differ == {
        "shortcut_decay", "encoder_final_layernorm", "zero_init_residual_branches", "decoder_skip_connections"
    }  # fmt: skip
    assert (plain.shortcut_decay, plain.encoder_final_layernorm) == (0.0, True)
    assert not plain.zero_init_residual_branches and not plain.decoder_skip_connections


def test_the_sit_recipes_differ_from_their_plain_twins_in_the_decay_and_long_skips_only():
    for size in ("b2", "xl2"):
        decayed = _values(SCRIPTS / "recipes" / f"sit_{size}_in1k_256.yaml")
        plain = _values(SCRIPTS / "recipes" / f"sit_{size}_in1k_256_plain.yaml")
        assert set(decayed) == set(plain)
        assert {key for key in decayed if decayed[key] != plain[key]} == {
            "shortcut_decay",
            "long_skip_connections",
        }
        assert (decayed["shortcut_decay"], plain["shortcut_decay"]) == (
            0.2,
            0.0,
        )  # alpha_min 0.8: the paper's


def test_the_sit_xl2_recipes_build_sit_xl2_with_and_without_the_decay():
    """SiT-XL/2's shape (28 blocks of width 1152, patch 2) from both files, built on the meta device (no
    memory, no weights): the decayed one decays 56 sublayers to 0.8 and adds 14 long skips, the plain one is
    the stock DiT."""
    script = load_script("train_diffusion.py")
    models = {}
    for name in ("sit_xl2_in1k_256", "sit_xl2_in1k_256_plain"):
        recipe = SCRIPTS / "recipes" / f"{name}.yaml"
        argv = ["--output_dir", "o", "--recipe", str(recipe), "--image_size", "32"]  # 256 px: 32 px latents
        model_args, _, _ = script.parse_arguments(argv)
        with torch.device("meta"):
            models[name] = script.build_model(model_args, 4, 1000)
    decayed, plain = models.values()
    for model in (decayed, plain):
        config = model.config
        assert (config.num_layers, config.num_attention_heads * config.attention_head_dim) == (28, 1152)
        assert (config.patch_size, config.sample_size, config.in_channels) == (2, 32, 4)
    assert len(decayed.shortcut_coefficients) == 56 and decayed.shortcut_coefficients[-1] == pytest.approx(
        0.8
    )
    assert set(plain.shortcut_coefficients) == {1.0} and not plain.config.long_skip_connections

    def count(model):
        return sum(parameter.numel() for parameter in model.parameters())

    assert count(decayed) - count(plain) == 14 * (1152 * 1152 + 1152)  # the long skips' Linear layers


def test_a_command_line_flag_overrides_the_recipe_end_to_end(tmp_path):
    """The paper's ViT-B recipe, shrunk from the command line to run in seconds: what is not overridden (the
    decay, the recipe's flags, the optimisation) comes from the file."""
    out = tmp_path / "run"
    recipe = SCRIPTS / "recipes" / "mae_vit_base_in1k.yaml"
    args = ["--recipe", str(recipe), *TINY_MAE, "--dataset_name", "embedded:mnist", "--mixed_precision", "no"]
    args += [
        "--per_device_train_batch_size",
        "16",
        "--gradient_accumulation_steps",
        "1",
        "--max_train_steps",
        "2",
    ]
    args += ["--max_train_samples", "64", "--max_eval_samples", "32", "--knn_train_samples", "32"]
    args += ["--knn_eval_samples", "32", "--output_dir", str(out)]
    launch("train_mae.py", args)
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["image_size"], config["num_hidden_layers"]) == (
        32,
        16,
        2,
    )  # the flags
    assert (config["shortcut_decay"], config["norm_pix_loss"], config["decoder_skip_connections"]) == (
        0.3,
        True,
        True,
    )
    run = json.loads((out / "results.json").read_text())["run"]
    assert run["learning_rate"] == pytest.approx(1.5e-4 * 16 / 256)  # the recipe's base lr, the flags' batch


def test_an_unknown_recipe_key_stops_the_script_naming_it(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("image_size: 16\nshortcut_decai: 0.3\n")
    for script in ("train_mae.py", "train_diffusion.py"):
        result = run_in_process(script, ["--recipe", str(recipe), "--output_dir", str(tmp_path / "out")])
        assert result.returncode == 2
        assert (
            f"error: --recipe {recipe}: unknown key 'shortcut_decai' (did you mean shortcut_decay?)"
            in result.stderr
        )
    assert not (tmp_path / "out").exists()


def test_a_bare_mae_command_builds_the_readme_model():
    """No --recipe, no checkpoint: the CPU default recipe gives the README's model (6 blocks, width 192, 28 px
    in 4 px patches, decoder 4 x 128), with the released recipe's decay 0.3 from the config class."""
    script = load_script("train_mae.py")
    model_args, _, args = script.parse_arguments(["--output_dir", "o"])
    assert args.recipe == str(script.DEFAULT_RECIPE) and (args.num_train_epochs, args.base_learning_rate) == (
        3,
        1e-3,
    )
    torch.manual_seed(0)
    model = script.build_model(model_args)
    config = model.config
    expected = {
        "image_size": 28, "patch_size": 4, "num_channels": 3, "hidden_size": 192, "num_hidden_layers": 6,
        "num_attention_heads": 3, "intermediate_size": 768, "decoder_hidden_size": 128,
        "decoder_num_hidden_layers": 4, "decoder_num_attention_heads": 4, "decoder_intermediate_size": 512,
        "mask_ratio": 0.75, "norm_pix_loss": True, "shortcut_decay": 0.3, "shortcut_schedule": "linear",
        "encoder_final_layernorm": False, "zero_init_residual_branches": True,
        "decoder_skip_connections": True,
    }  # fmt: skip
    assert {key: getattr(config, key) for key in expected} == expected
    assert alpha_eff(model.shortcut_coefficients) == pytest.approx(alpha_eff(shortcut_coefficients(12, 0.3)))
    explicit, _, _ = script.parse_arguments(["--output_dir", "o", "--recipe", str(script.DEFAULT_RECIPE)])
    torch.manual_seed(0)
    same = script.build_model(explicit)
    assert same.config.to_dict() == config.to_dict()
    assert all(
        torch.equal(a, b)
        for a, b in zip(same.state_dict().values(), model.state_dict().values(), strict=True)
    )


def test_a_bare_diffusion_command_builds_the_small_unet_and_dit():
    script = load_script("train_diffusion.py")
    unet_args, _, _ = script.parse_arguments(["--output_dir", "o"])
    unet = script.build_model(unet_args, 1, None)
    assert (unet.config.sample_size, tuple(unet.config.block_out_channels), unet.config.layers_per_block) == (
        28, (32, 64), 1
    )  # fmt: skip
    assert (unet.config.shortcut_decay, unet.config.norm_num_groups, unet.config.in_channels) == (0.2, 8, 1)
    dit_args, _, _ = script.parse_arguments(["--output_dir", "o", "--model", "dit"])
    dit = script.build_model(dit_args, 3, 10)
    shape = (
        "sample_size",
        "num_layers",
        "num_attention_heads",
        "attention_head_dim",
        "patch_size",
        "in_channels",
    )
    assert [dit.config[key] for key in shape] == [28, 6, 4, 32, 4, 3]
    assert (dit.config.num_embeds_ada_norm, dit.config.long_skip_connections, dit.config.shortcut_decay) == (
        10, True, 0.2
    )  # fmt: skip


def test_a_default_run_saves_checkpoints_and_resumes_from_the_latest(tmp_path):
    """Checkpoints are on by default (issue: a run killed at step 633 of 1,170 lost 69 minutes): a run past
    the default interval writes one unasked, and ``--resume_from_checkpoint latest`` picks it up."""
    script = load_script("train_mae.py")
    every = script.TrainingArguments(output_dir="x").checkpointing_steps
    out = tmp_path / "run"
    args = [
        *TINY_MAE,
        "--per_device_train_batch_size",
        "4",
        "--max_train_samples",
        "256",
        "--eval_every",
        "0",
    ]
    args += ["--max_eval_samples", "32", "--dataloader_num_workers", "0", "--output_dir", str(out)]
    launch("train_mae.py", [*args, "--max_train_steps", str(every + 1)])
    assert [path.name for path in (out / "checkpoints").iterdir()] == [f"checkpoint-{every}"]
    resumed = launch(
        "train_mae.py", [*args, "--max_train_steps", str(every + 5), "--resume_from_checkpoint", "latest"]
    )
    assert f"resumed from {out / 'checkpoints' / f'checkpoint-{every}'} (step {every})" in resumed.stdout
    assert json.loads((out / "results.json").read_text())["steps"] == every + 5
