"""The reproduction experiment's smoke setting: every variant trained through the real script and scored.

Smoke data is too small for any claim: this checks that every number is produced, not what it says.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hf_resdecay import alpha_eff, shortcut_coefficients

ROOT = Path(__file__).resolve().parents[2]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _experiment():
    return _load(ROOT / "experiments" / "reproduce_mae.py")


def _model_for(variant: str):
    """The model ``train_mae.py`` builds from a variant's flags (default sizes), without training it."""
    script = _load(ROOT / "training_scripts" / "train_mae.py")
    flags = ["--output_dir", "unused", *_experiment().VARIANTS[variant]]
    model_args, _, _ = script.parse_arguments(flags)
    return script.build_model(model_args)


@pytest.mark.parametrize(("variant", "vit_b_decay"), [("decay_0.53", 0.3), ("decay_0.68", 0.4)])
def test_matched_variants_give_vit_b_alpha_eff(variant, vit_b_decay):
    """The investigation variants' claim: at the default depth they match ViT-B's (12 blocks) alpha_eff."""
    model = _model_for(variant)
    vit_b = alpha_eff(shortcut_coefficients(24, vit_b_decay))
    assert model.config.num_hidden_layers == 6
    assert alpha_eff(model.shortcut_coefficients) == pytest.approx(vit_b, rel=0.05)


def test_dataset_and_image_size_reach_the_training_script(tmp_path):
    experiment = _experiment()
    args = experiment.parse_args(["--dataset", "embedded:cluttered-mnist", "--image-size", "48"])
    command = experiment.train_command(tmp_path / "run", "decay_0.3", 0, args)
    script_args = command[command.index(str(experiment.SCRIPT)) + 1 :]
    assert script_args[script_args.index("--dataset_name") + 1] == "embedded:cluttered-mnist"
    assert script_args[script_args.index("--image_size") + 1] == "48"
    default = experiment.train_command(tmp_path / "run", "plain", 0, experiment.parse_args([]))
    assert default[default.index("--dataset_name") + 1] == "embedded:mnist" and "--image_size" not in default
    with pytest.raises(SystemExit):
        experiment.parse_args(["--image-size", "0"])


def test_cosine_variant_builds_a_cosine_schedule():
    model = _model_for("decay_0.3_cosine")
    assert model.shortcut_coefficients == shortcut_coefficients(12, 0.3, "cosine")


def test_smoke_run_produces_every_number_and_resumes(tmp_path):
    experiment = _experiment()
    out = tmp_path / "mae"
    summary = experiment.main(["--smoke", "--output", str(out)])
    assert list(summary) == list(experiment.DEFAULT_VARIANTS)
    for variant, entry in summary.items():
        assert entry["seeds"] == [0, 1]
        for metric in experiment.METRICS:
            assert len(entry[metric]["values"]) == 2, (variant, metric)
            assert all(math.isfinite(value) for value in entry[metric]["values"]), (variant, metric)
        assert len(entry["knn_top1_per_layer"]) == 3  # embeddings + 2 blocks
    assert summary["plain"]["alpha_eff"]["mean"] == 1.0 and summary["decay_0.4"]["alpha_eff"]["mean"] < 1.0
    saved = json.loads((out / "results.json").read_text())
    assert saved["variants"]["decay_0.3"]["knn_top1"] == summary["decay_0.3"]["knn_top1"]
    assert 0 <= saved["raw_pixels"]["knn_top1"] <= 100 and saved["raw_pixels"]["effective_rank"] >= 1
    assert saved["raw_pixels"]["mean_patch_size"] == 4  # the smoke model's patch, read from its config
    assert 0 <= saved["raw_pixels"]["mean_patch_knn_top1"] <= 100
    table = (out / "results.md").read_text().splitlines()
    rows = 2 + len(experiment.DEFAULT_VARIANTS)
    assert all(" ± " in line for line in table[2:rows]) and table[rows + 1].startswith("Raw pixels")
    with Image.open(out / "depth.png") as image:
        assert image.format == "PNG"

    weights = out / "decay_0.3" / "seed-0" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = experiment.main(["--smoke", "--output", str(out), "--variants", "decay_0.3"])
    assert weights.stat().st_mtime_ns == before  # finished runs are not redone
    assert again["decay_0.3"]["knn_top1"] == summary["decay_0.3"]["knn_top1"]


def test_last_skip_only_variant_reads_the_last_encoder_block_alone():
    model = _model_for("decay_0.3_last_skip_only")
    assert model.config.num_decoder_skip_connections == 1 and model._skip_sources() == [5]
    assert _model_for("plain_one_decoder_block").config.decoder_num_hidden_layers == 1


def test_decay_alone_differs_from_plain_only_in_the_decay():
    plain, alone = _model_for("plain").config.to_dict(), _model_for("decay_0.3_alone").config.to_dict()
    differing = {key for key in plain if plain[key] != alone.get(key)}
    assert differing == {"shortcut_decay"}, differing


def test_one_seed_has_no_standard_deviation():
    experiment = _experiment()
    scores = {metric: 1.5 for metric in (*experiment.METRICS, "final_train_loss")}
    scores |= {"knn_top1_per_layer": [1.0, 2.0], "effective_rank_per_layer": [3.0, 4.0]}
    one = experiment.summarise({"plain": {0: scores}})
    assert one["plain"]["knn_top1"]["std"] is None
    row = experiment.markdown_table(one).splitlines()[2]
    assert "±" not in row and "1.50" in row
    two = experiment.summarise({"plain": {0: scores, 1: scores | {"knn_top1": 3.5}}})
    assert two["plain"]["knn_top1"]["std"] == pytest.approx(2**0.5)
    assert "2.50 ± 1.41" in experiment.markdown_table(two)


@pytest.mark.parametrize("shape", [(3, 12, 12), (3, 14, 13, 2)])
def test_mean_patch_averages_every_whole_patch(shape):
    """Against explicit loops over the patches (a partial last row or column is dropped)."""
    images = np.random.default_rng(0).random(shape, dtype=np.float32)
    size = 4
    expected = []
    for image in images:
        patches = [
            image[top : top + size, left : left + size]
            for top in range(0, image.shape[0] - size + 1, size)
            for left in range(0, image.shape[1] - size + 1, size)
        ]
        expected.append(np.mean(patches, axis=0).ravel())
    np.testing.assert_allclose(_experiment().mean_patch(images, size), np.stack(expected), rtol=1e-6)
