"""``hf-resdecay align`` end to end: checkpoints on the local Hub server and in a folder, real images."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTImageProcessorPil

from hf_resdecay import ViTMAEDecayConfig, ViTMAEDecayForPreTraining, ViTMAEDecayModel, shortcut_coefficients
from hf_resdecay.alignment import REPORT_PLOTS, analyze
from hf_resdecay.alignment.command import select_samples
from hf_resdecay.cli import main
from hf_resdecay.data import load_image_dataset

from .conftest import MAE_DECODER, VIT, randomize

REPO = "org/align-tiny"


def _fails(capsys, *args) -> tuple[int, str]:
    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def _check_plots(folder) -> None:
    for name in REPORT_PLOTS:
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and min(image.size) > 200


@pytest.fixture(scope="module")
def mnist_model(hub_server) -> ViTMAEDecayModel:
    """A decayed ViTMAE encoder reading 28x28 grayscale images, pushed without an image processor."""
    config = ViTMAEDecayConfig(
        **{**VIT, "image_size": 28, "patch_size": 7},
        num_channels=1,
        shortcut_decay=0.4,
        zero_init_residual_branches=False,
    )
    model = randomize(ViTMAEDecayModel(config))
    model.push_to_hub(REPO)
    return model


@pytest.fixture(scope="module")
def rgb_checkpoint(tmp_path_factory):
    """A 3-channel decayed MAE for 16x16 images, saved to a folder with its image processor."""
    config = ViTMAEDecayConfig(
        **{**VIT, "image_size": 16, "patch_size": 4}, **MAE_DECODER, zero_init_residual_branches=False
    )
    folder = tmp_path_factory.mktemp("rgb_checkpoint")
    randomize(ViTMAEDecayForPreTraining(config)).save_pretrained(folder)
    ViTImageProcessorPil(
        size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def digits_dir(digits_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    digits_dataset.save_to_disk(folder)
    return folder


def test_align_hub_model_on_the_default_dataset(mnist_model, tmp_path, capsys):
    out = tmp_path / "align"
    args = ["align", REPO, "--samples", "2", "--top-k", "4", "--revision", "main", "--output", str(out)]
    assert main([*args, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    _check_plots(out)

    names = [f"layers.{index}" for index in range(VIT["num_hidden_layers"])]
    assert [block["name"] for block in report["blocks"]] == names
    assert report["model"] == REPO and report["num_samples"] == 2 and report["top_k"] == 4
    assert report["num_classes"] == 10  # the MNIST ClassLabel, not the 2 classes in the sample
    assert report["settings"]["dataset"] == "embedded:mnist" and report["settings"]["split"] == "test"
    assert report["settings"]["revision"] == "main"
    assert report["settings"]["dtype"] == "float32" and report["neural_collapse"] is not None
    assert all(block["alpha"] < 1 for block in report["blocks"][1:])  # decayed shortcuts subtracted
    # Per sublayer, as the model card lists them; the block's identity part is their product.
    card_schedule = mnist_model.shortcut_coefficients
    header = next(line for line in printed.splitlines() if line.startswith("block"))
    assert header.split() == ["block", "alpha_attn", "alpha_mlp", "alpha_block", "s1", "rank", "|<u1,v1>|"]
    for index, (name, block) in enumerate(zip(names, report["blocks"], strict=True)):
        attention, mlp = card_schedule[2 * index], card_schedule[2 * index + 1]
        assert block["sublayer_alphas"] == pytest.approx([attention, mlp])
        assert block["alpha"] == pytest.approx(attention * mlp)
        row = next(line for line in printed.splitlines() if line.startswith(name)).split()
        assert row[1:4] == [f"{attention:.3f}", f"{mlp:.3f}", f"{attention * mlp:.3f}"]
    # Two samples of two classes: NC1 has no within-class variability to measure, and says so.
    assert report["neural_collapse"]["nc1"] is None and report["summary"]["nc1"] is None
    assert report["notes"] == [
        "NC1 is undefined: 2 of 2 classes have a single sample, and within-class variability needs at least "
        "2 per class; analyse more samples"
    ]
    assert f"note: {report['notes'][0]}" in printed and "NC1 -" in printed
    assert str(out / "report.json") in printed and str(out / "alignment.png") in printed

    # The same numbers from the library on pixels built here by hand: (x / 255 - 0.5) / 0.5, one channel.
    test = load_image_dataset(split="test")
    indices = select_samples(np.asarray(test["label"]), len(test), 2, seed=0)
    assert report["labels"] == [test[i]["label"] for i in indices] and len(set(report["labels"])) == 2
    pixels = np.stack([np.asarray(test[i]["image"], dtype=np.float32) for i in indices])
    pixels = torch.from_numpy(pixels / 127.5 - 1.0)[:, None]
    expected = analyze(mnist_model, pixels, report["labels"], top_k=4, num_classes=10)
    for block, reference in zip(report["blocks"], expected.blocks, strict=True):
        assert block["singular_values"] == pytest.approx(reference.singular_values, rel=1e-3)
        assert block["alignment"] == pytest.approx(reference.alignment, abs=1e-3)


def test_align_local_folder_randomized_float64(rgb_checkpoint, digits_dir, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["align", str(rgb_checkpoint), "--dataset", str(digits_dir), "--split", "train"]
    args += ["--samples", "5", "--top-k", "3", "--method", "randomized", "--dtype", "float64"]
    args += ["--power-iters", "3", "--num-classes", "4", "--coupling-samples", "1", "--seed", "3"]
    assert main([*args, "--output", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    _check_plots(out)
    assert report["num_samples"] == 5 and report["num_classes"] == 4 and report["coupling_k"] == 3
    assert report["settings"]["dtype"] == "float64" and report["settings"]["power_iters"] == 3
    assert report["settings"]["coupling_samples"] == 1 and report["settings"]["split"] == "train"
    assert len(set(report["labels"])) == 5  # class-balanced draw: five samples, five digits
    alphas = shortcut_coefficients(2 * VIT["num_hidden_layers"], ViTMAEDecayConfig().shortcut_decay)
    for index, block in enumerate(report["blocks"]):
        assert block["method"] == "randomized" and block["dim"] == 17 * VIT["hidden_size"]
        assert block["alpha"] == pytest.approx(alphas[2 * index] * alphas[2 * index + 1])
        assert block["singular_values"][0] > block["singular_values"][-1] > 0
    assert [block["name"] for block in report["blocks"]] == ["layers.0", "layers.1", "layers.2"]


def test_select_samples_is_class_balanced_and_seeded():
    labels = np.array([0] * 50 + [1] * 5 + [2] * 45)
    picked = select_samples(labels, 100, 7, seed=1)
    assert labels[picked].tolist() == [0, 1, 2, 0, 1, 2, 0]  # round-robin over sorted classes
    assert picked == select_samples(labels, 100, 7, seed=1) != select_samples(labels, 100, 7, seed=2)
    assert len(set(select_samples(None, 10, 10))) == 10 and len(select_samples(labels, 100, 500)) == 100


def test_bad_arguments_exit_with_a_clear_message(rgb_checkpoint, digits_dir, capsys, tmp_path):
    out = ["--output", str(tmp_path / "never")]
    code, err = _fails(capsys, "align", str(rgb_checkpoint), "--samples", "0", *out)
    assert code == 2 and "argument --samples: must be an integer >= 1; got 0" in err
    code, err = _fails(capsys, "align", str(rgb_checkpoint), "--dtype", "float16", *out)
    assert code == 2 and "argument --dtype: invalid choice: 'float16'" in err
    code, err = _fails(
        capsys, "align", str(rgb_checkpoint), "--dataset", str(digits_dir), "--split", "val", *out
    )
    assert code == 2 and "split='val' is not in" in err
    code, err = _fails(
        capsys, "align", str(rgb_checkpoint), "--dataset", str(digits_dir), "--top-k", "5000", *out
    )
    assert code == 2 and "top_k must be in [1, 544]" in err
    assert not (tmp_path / "never").exists()
