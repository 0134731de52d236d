"""Feature extraction at scale on one process: DataLoader workers, device and autocast, the memory-mapped
cache keyed by content (not path), the one-line note about unused decoder tensors, and label refusals."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from transformers import ViTImageProcessorPil

from hf_resdecay import ViTMAEDecayConfig, ViTMAEDecayForPreTraining, ViTMAEDecayModel
from hf_resdecay.cli import main
from hf_resdecay.evaluation import evaluate_representations, extract_features
from hf_resdecay.evaluation.features import LayerFiles

TINY = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
TINY |= dict(intermediate_size=64, zero_init_residual_branches=False)
DECODER = dict(decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2)
DECODER |= dict(decoder_intermediate_size=32)


@pytest.fixture(scope="module")
def processor():
    return ViTImageProcessorPil(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return ViTMAEDecayModel(ViTMAEDecayConfig(**TINY)).eval()


@pytest.fixture
def small(digits_dataset):
    return digits_dataset["test"].select(range(50))


def test_workers_and_the_memory_mapped_cache_give_the_serial_features(encoder, small, processor, tmp_path):
    options = dict(layers="all", image_processor=processor, batch_size=8, progress=False)
    serial = extract_features(encoder, small, cache=False, num_workers=0, device="cpu", **options)
    assert all(type(values) is np.ndarray for values in serial.features.values())  # in memory, no cache
    workers = extract_features(encoder, small, cache_dir=tmp_path, num_workers=2, **options)
    cached = extract_features(encoder, small, cache_dir=tmp_path, num_workers=2, **options)
    assert not workers.from_cache and cached.from_cache
    assert isinstance(cached.features, LayerFiles) and cached.layers == [0, 1, 2]
    for layer in serial.layers:
        assert isinstance(cached.features[layer], np.memmap)  # read lazily from its .npy file
        np.testing.assert_array_equal(workers.features[layer], serial.features[layer])
        np.testing.assert_array_equal(cached.features[layer], serial.features[layer])
    np.testing.assert_array_equal(cached.labels, np.asarray(small["label"]))
    (entry,) = [path for path in tmp_path.iterdir() if path.is_dir()]
    record = json.loads((tmp_path / f"{entry.name}.json").read_text())
    assert sorted(record["files"]) == ["labels.npy", "layer_0.npy", "layer_1.npy", "layer_2.npy", "meta.json"]
    assert np.load(entry / "layer_2.npy").shape == (50, 32)


def test_autocast_dtype_is_close_cached_apart_and_the_model_stays_where_it_was(
    encoder, small, processor, tmp_path
):
    options = dict(image_processor=processor, cache_dir=tmp_path, progress=False, num_workers=0)
    full = extract_features(encoder, small, **options)
    half = extract_features(encoder, small, dtype="bfloat16", device="cpu", **options)
    assert not half.from_cache and half.meta["dtype"] == "bfloat16" and half.last().dtype == np.float32
    np.testing.assert_allclose(half.last(), full.last(), atol=0.1, rtol=0.05)
    assert not np.array_equal(half.last(), full.last())
    assert extract_features(encoder, small, dtype="bfloat16", **options).from_cache
    assert next(encoder.parameters()).device.type == "cpu" and not encoder.training
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16; got 'int8'"):
        extract_features(encoder, small, dtype="int8", **options)
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0"):
        extract_features(encoder, small, **{**options, "num_workers": -1})
    if not torch.cuda.is_available():
        with pytest.raises(
            ValueError, match="device cuda: CUDA is not available on this machine; use device cpu"
        ):
            extract_features(encoder, small, device="cuda", **options)


@pytest.fixture
def pretraining_folder(tmp_path, processor):
    torch.manual_seed(0)
    folder = tmp_path / "model"
    ViTMAEDecayForPreTraining(ViTMAEDecayConfig(**TINY, **DECODER)).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_a_byte_identical_copy_of_a_checkpoint_hits_the_cache(
    pretraining_folder, digits_dataset, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_RESDECAY_CACHE", str(tmp_path / "cache"))
    data = digits_dataset["test"].select(range(40)).train_test_split(test_size=10, seed=0)
    data.save_to_disk(tmp_path / "data")
    copy = tmp_path / "copied elsewhere"
    shutil.copytree(pretraining_folder, copy)

    def evaluate(model) -> dict:
        args = [
            "evaluate",
            str(model),
            "--dataset",
            str(tmp_path / "data"),
            "--metrics",
            "knn",
            "--device",
            "cpu",
        ]
        assert main([*args, "--output", str(tmp_path / "r.json")]) == 0
        return json.loads((tmp_path / "r.json").read_text())

    first = evaluate(pretraining_folder)
    again = evaluate(copy)
    assert first["features_from_cache"] == {"train": False, "test": False}
    assert again["features_from_cache"] == {"train": True, "test": True} and again["knn"] == first["knn"]


def test_the_results_table_names_the_splits_and_their_sizes(
    pretraining_folder, digits_dataset, tmp_path, capsys
):
    digits_dataset.save_to_disk(tmp_path / "data")
    args = ["evaluate", str(pretraining_folder), "--dataset", str(tmp_path / "data"), "--metrics", "knn"]
    args += ["--max-train-samples", "60", "--max-test-samples", "25", "--no-cache", "--num-workers", "1"]
    assert main([*args, "--output", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "train split 'train' (60 images: kNN bank, probe training)" in out
    assert "test split 'test' (25 images: scored; effective rank)" in out


def test_a_pretraining_checkpoint_loads_as_an_encoder_with_one_line_about_the_decoder(
    pretraining_folder, small, processor, capfd, caplog
):
    with caplog.at_level(logging.WARNING):
        result = extract_features(str(pretraining_folder), small, cache=False, progress=False)
        again = extract_features(str(pretraining_folder), small, cache=False, progress=False)
    np.testing.assert_array_equal(result.last(), again.last())
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "UNEXPECTED" not in err
    notes = [record.getMessage() for record in caplog.records if "not used" in record.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0]  # once per checkpoint, on one line
    decoder = [name for name in ViTMAEDecayForPreTraining.from_pretrained(pretraining_folder).state_dict()]
    count = sum(name.startswith("decoder.") for name in decoder)
    assert f"{count} tensors of the checkpoint (decoder.*) are not used by ViTMAEDecayModel" in notes[0]
    assert "pretraining decoder" in notes[0]


def test_negative_or_missing_labels_are_refused_by_the_python_api(encoder, digits_dataset, processor):
    from datasets import Value

    train = digits_dataset["train"].select(range(30))
    hidden = digits_dataset["test"].select(range(10)).cast_column("label", Value("int64"))
    hidden = hidden.map(lambda row: {"label": -1})
    with pytest.raises(ValueError, match=r"test_dataset has 10 negative label\(s\).*--test-split validation"):
        evaluate_representations(encoder, train, hidden, metrics=["knn"], cache=False, progress=False)
    missing = hidden.map(lambda row, index: {"label": None if index < 3 else 1}, with_indices=True)
    with pytest.raises(ValueError, match=r"test_dataset lacks 3 label\(s\)"):
        evaluate_representations(encoder, train, missing, metrics=["knn"], cache=False, progress=False)
    ranks = evaluate_representations(
        encoder, train, hidden, metrics=["effective_rank"], layers=[-1], cache=False, progress=False
    )
    assert ranks["samples"] == {"train": 30, "test": 10} and len(ranks["effective_rank"]["values"]) == 1
