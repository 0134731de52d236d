"""``evaluate`` and ``align`` refuse bad input in one line, exit status 2, before any expensive work."""

import json
import shutil

import pytest
import torch
from datasets import ClassLabel, DatasetDict
from diffusers import DDPMPipeline, DDPMScheduler
from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

from hf_resdecay import UNet2DDecayModel
from hf_resdecay.cli import main
from hf_resdecay.pipelines import make_pipeline_portable

from ..models.unet_2d_decay.helpers import TINY


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("checkpoint")
    config = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    config.image_size, config.patch_size = 16, 4
    ViTModel(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(digits_dataset, tmp_path_factory):
    """Digits with an ImageNet-like layout: labelled train and validation, a test split of -1 labels."""
    folder = tmp_path_factory.mktemp("data")
    small = digits_dataset["test"].select(range(60))
    hidden = small.select(range(20)).map(lambda row: {"label": -1})
    hidden = hidden.cast_column("label", ClassLabel(names=small.features["label"].names))
    splits = {"train": small.select(range(20, 40)), "validation": small.select(range(40, 60)), "test": hidden}
    DatasetDict(splits).save_to_disk(folder)
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty package cache: a test can tell whether any features were extracted."""
    monkeypatch.setenv("HF_RESDECAY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _refused(capsys, *args) -> str:
    """Run the command; it must exit with status 2 and one ``error: ...`` line on stderr."""
    try:
        code = main([str(arg) for arg in args])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def _damaged(checkpoint, tmp_path, kind: str):
    folder = tmp_path / kind
    shutil.copytree(checkpoint, folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if kind == "truncated":
        weights.write_bytes(data[: len(data) // 2])
        return folder, weights
    if kind == "bit-flipped":
        data[40] ^= 0x10  # inside the JSON header of tensor names, dtypes and offsets
        weights.write_bytes(data)
        return folder, weights
    (folder / "config.json").write_text('{"model_type": "vit", "hidden_size": 16,')
    return folder, folder / "config.json"


def test_missing_model_folder_is_named(capsys, cache, tmp_path):
    err = _refused(capsys, "evaluate", "/no/such/dir", "--output", tmp_path / "r.json")
    assert "/no/such/dir does not exist" in err and "Repo id" not in err and "Hub id" in err
    err = _refused(capsys, "evaluate", "/no/such/dir", "--metrics", "fid", "--output", tmp_path / "r.json")
    assert "/no/such/dir does not exist" in err and "pipeline folder" in err
    err = _refused(capsys, "align", "/no/such/dir", "--output", tmp_path / "align")
    assert "/no/such/dir does not exist" in err
    assert not cache.exists() and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("kind", ["truncated", "bit-flipped", "invalid-config"])
def test_damaged_local_checkpoint_is_refused_by_evaluate_and_align(
    checkpoint, data, capsys, cache, tmp_path, kind
):
    folder, damaged = _damaged(checkpoint, tmp_path, kind)
    err = _refused(capsys, "evaluate", folder, "--dataset", data, "--output", tmp_path / "r.json")
    assert str(damaged) in err and ("save_pretrained" in err or "download it again" in err)
    err = _refused(capsys, "align", folder, "--dataset", data, "--samples", 4, "--output", tmp_path / "a")
    assert str(damaged) in err
    assert not cache.exists() and not (tmp_path / "r.json").exists() and not (tmp_path / "a").exists()


def test_hidden_test_labels_are_refused_before_feature_extraction(checkpoint, data, capsys, cache, tmp_path):
    out = tmp_path / "r.json"
    err = _refused(capsys, "evaluate", checkpoint, "--dataset", data, "--metrics", "knn", "--output", out)
    assert "split 'test'" in err and "negative label" in err and "--test-split validation" in err
    assert not cache.exists() and not out.exists()  # no features were extracted
    args = ["--dataset", data, "--metrics", "knn", "--test-split", "validation", "--output", out]
    assert main(["evaluate", str(checkpoint), *map(str, args)]) == 0
    assert json.loads(out.read_text())["samples"] == {"train": 20, "test": 20}
    rank = ["evaluate", str(checkpoint), "--dataset", str(data), "--metrics", "effective_rank"]
    assert main([*rank, "--output", str(out)]) == 0  # no labels needed, so none are checked


def test_fid_samples_are_checked_before_any_model_is_loaded(checkpoint, data, capsys, tmp_path):
    torch.manual_seed(0)
    pipeline = DDPMPipeline(unet=UNet2DDecayModel(**TINY), scheduler=DDPMScheduler(num_train_timesteps=10))
    folder = tmp_path / "pipeline"
    pipeline.save_pretrained(folder)
    make_pipeline_portable(folder)
    args = ["evaluate", folder, "--dataset", data, "--metrics", "fid", "--output", tmp_path / "f.json"]
    err = _refused(capsys, *args, "--fid-samples", 1, "--fid-feature-model", checkpoint)
    assert "--fid-samples must be at least 2" in err
    err = _refused(capsys, *args, "--fid-samples", 8, "--num-processes", 2, "--fid-feature-model", checkpoint)
    assert "drop --num-processes 2 for --metrics fid" in err
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 16)
    err = _refused(capsys, *args, "--fid-samples", 8, "--fid-feature-model", checkpoint)
    assert "diffusion_pytorch_model.safetensors is damaged" in err
    err = _refused(capsys, *args, "--fid-samples", 8, "--fid-weights", tmp_path / "missing.pth")
    assert "--fid-weights" in err and "missing.pth" in err


def test_output_is_checked_before_any_work(checkpoint, data, capsys, cache, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    args = ["evaluate", checkpoint, "--dataset", data, "--metrics", "knn", "--test-split", "validation"]
    err = _refused(capsys, *args, "--output", tmp_path / "a-file" / "results.json")
    assert "--output" in err and "a-file is a file, not a folder" in err
    (tmp_path / "results").mkdir()
    err = _refused(capsys, *args, "--output", tmp_path / "results")
    assert "is a folder; give a file path" in err
    assert not cache.exists()


def test_k_is_checked_before_feature_extraction(checkpoint, data, capsys, cache, tmp_path):
    args = ["evaluate", checkpoint, "--dataset", data, "--metrics", "knn", "--test-split", "validation"]
    err = _refused(capsys, *args, "--k", 50, "--output", tmp_path / "r.json")
    assert "--k 50 exceeds the 20 images of split 'train'" in err
    assert not cache.exists()
