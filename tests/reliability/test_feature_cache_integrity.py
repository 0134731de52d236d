"""Feature-cache entries are verified against their recorded SHA-256 and recomputed when anything is off."""

import json
import logging

import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

from hf_resdecay.cli import main
from hf_resdecay.evaluation import extract_features

TINY_VIT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16
)


@pytest.fixture
def setup(digits_dataset, tmp_path):
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(**TINY_VIT, patch_size=4), add_pooling_layer=False)
    processor = ViTImageProcessorPil(
        size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    options = dict(image_processor=processor, cache_dir=tmp_path / "cache", layers="all", progress=False)
    return model, digits_dataset["test"].select(range(30)), options, tmp_path / "cache"


def _forge(entry) -> None:
    """Replace every layer file of a cache entry by a well-formed one holding the one-hot labels: a perfect
    but fake kNN score."""
    labels = np.load(entry / "labels.npy")
    for layer in entry.glob("layer_*.npy"):
        np.save(layer, np.eye(10, dtype=np.float32)[labels])


def _entry(cache):
    (entry,) = [path for path in cache.iterdir() if path.is_dir()]
    return entry


def test_forged_entry_is_recomputed_and_the_cache_heals(setup, caplog):
    model, data, options, cache = setup
    first = extract_features(model, data, **options)
    entry = _entry(cache)
    assert not first.from_cache
    _forge(entry)
    with caplog.at_level(logging.WARNING, logger="hf_resdecay"):
        second = extract_features(model, data, **options)
    assert not second.from_cache
    for layer in first.layers:
        np.testing.assert_array_equal(second.features[layer], first.features[layer])
    (message,) = [record.getMessage() for record in caplog.records]
    assert str(entry) in message and "SHA-256" in message and "recomputing" in message
    third = extract_features(model, data, **options)
    assert third.from_cache and "cached" in third.meta


def test_truncated_entry_is_recomputed_and_no_cache_replaces_it(setup, caplog):
    model, data, options, cache = setup
    first = extract_features(model, data, **options)
    entry = _entry(cache) / "layer_2.npy"
    good = entry.read_bytes()
    entry.write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING, logger="hf_resdecay"):
        again = extract_features(model, data, **options)
    assert (
        not again.from_cache and len(caplog.records) == 1 and "recomputing" in caplog.records[0].getMessage()
    )
    np.testing.assert_array_equal(again.last(), first.last())
    assert extract_features(model, data, **options).from_cache

    entry.write_bytes(good[:100])  # damaged again; a run without the cache must not leave it behind
    fresh = extract_features(model, data, cache=False, **options)
    assert not fresh.from_cache and entry.read_bytes() == good
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_resdecay"):
        assert extract_features(model, data, **options).from_cache
    assert not caplog.records


def test_results_json_records_whether_features_came_from_the_cache(setup, tmp_path, monkeypatch, capsys):
    _, data, _, _ = setup
    monkeypatch.setenv("HF_RESDECAY_CACHE", str(tmp_path / "home"))
    ViTModel(ViTConfig(**TINY_VIT, patch_size=4)).save_pretrained(tmp_path / "model")  # with its pooler
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "model")
    data.train_test_split(test_size=10, seed=0).save_to_disk(tmp_path / "data")
    args = ["evaluate", str(tmp_path / "model"), "--dataset", str(tmp_path / "data"), "--metrics", "knn"]

    def run(*extra) -> dict:
        assert main([*args, *extra, "--output", str(tmp_path / "r.json")]) == 0
        return json.loads((tmp_path / "r.json").read_text())

    first = run()
    assert first["features_from_cache"] == {"train": False, "test": False}
    second = run()
    assert second["features_from_cache"] == {"train": True, "test": True}
    assert second["knn"] == first["knn"]
    for entry in (tmp_path / "home" / "features").iterdir():
        if entry.is_dir():
            _forge(entry)
    forged = run()
    assert forged["features_from_cache"] == {"train": False, "test": False} and forged["knn"] == first["knn"]
    assert run("--no-cache")["features_from_cache"] == {"train": False, "test": False}
