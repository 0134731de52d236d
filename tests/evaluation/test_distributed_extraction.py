"""Feature extraction split between two CPU processes (gloo): ``hf-resdecay evaluate --num-processes 2``
(``accelerate launch -m hf_resdecay.cli evaluate`` underneath) and train_mae.py's kNN monitor under DDP and
FSDP must give exactly what one process gives."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import ViTImageProcessorPil

from hf_resdecay import ViTMAEDecayConfig, ViTMAEDecayForPreTraining
from hf_resdecay.evaluation import extract_features, knn_accuracy

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("monitor_worker.py")
TINY = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
TINY |= dict(intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1)
TINY |= dict(decoder_num_attention_heads=2, decoder_intermediate_size=32, zero_init_residual_branches=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    ViTMAEDecayForPreTraining(ViTMAEDecayConfig(**TINY)).save_pretrained(folder)
    ViTImageProcessorPil(
        size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_dir(digits_dataset, tmp_path_factory):
    """300 training and 23 test images: batches of 7 (the command) or 256 (the monitor) leave a short last
    batch and an uneven share."""
    from datasets import DatasetDict

    folder = tmp_path_factory.mktemp("data")
    small = {
        "train": digits_dataset["train"].select(range(300)),
        "test": digits_dataset["test"].select(range(23)),
    }
    DatasetDict(small).save_to_disk(folder)
    return folder


def _evaluate(model_dir, data_dir, cache: Path, output: Path, *extra: str) -> dict:
    """The installed console script in a fresh process, one thread per process (identical arithmetic)."""
    command = [
        Path(sys.executable).with_name("hf-resdecay"),
        "evaluate",
        str(model_dir),
        "--dataset",
        str(data_dir),
    ]
    command += [
        "--metrics",
        "knn,effective_rank",
        "--batch-size",
        "7",
        "--device",
        "cpu",
        "--output",
        str(output),
    ]
    env = {**os.environ, "HF_RESDECAY_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, *extra], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return {"stdout": result.stdout, "results": json.loads(output.read_text())}


def _entries(cache: Path) -> dict[str, dict[str, bytes]]:
    """Every cache entry's files, by entry and name."""
    folder = cache / "features"
    return {
        entry.name: {path.name: path.read_bytes() for path in entry.iterdir()}
        for entry in folder.iterdir()
        if entry.is_dir()
    }


def test_two_processes_write_exactly_the_one_process_features_in_order(model_dir, data_dir, tmp_path):
    one = _evaluate(model_dir, data_dir, tmp_path / "one", tmp_path / "one.json")
    two = _evaluate(model_dir, data_dir, tmp_path / "two", tmp_path / "two.json", "--num-processes", "2")
    assert two["stdout"].count("results:") == 1  # only the main process prints and writes
    assert two["results"]["knn"] == one["results"]["knn"]
    assert two["results"]["effective_rank"] == one["results"]["effective_rank"]
    single, split = _entries(tmp_path / "one"), _entries(tmp_path / "two")
    assert len(single) == 2 and single.keys() == split.keys()  # the same keys: train and test
    for entry, files in single.items():
        assert files == split[entry]  # byte for byte: every layer, the labels, the metadata
        labels = np.load(tmp_path / "two" / "features" / entry / "labels.npy")
        assert len(labels) in (300, 23)


def test_knn_monitor_shares_the_extraction_under_ddp_and_runs_on_the_main_process_under_fsdp(
    model_dir, data_dir, digits_dataset, tmp_path
):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(WORKER), str(model_dir), str(data_dir), str(tmp_path / "monitor.json")],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads((tmp_path / "monitor.json").read_text())

    encoder = ViTMAEDecayForPreTraining.from_pretrained(model_dir).vit
    processor = ViTImageProcessorPil.from_pretrained(model_dir)
    options = dict(image_processor=processor, cache=False, progress=False, batch_size=256)
    bank = extract_features(encoder, digits_dataset["train"].select(range(300)), **options)
    queries = extract_features(encoder, digits_dataset["test"].select(range(23)), **options)
    expected = knn_accuracy(bank.last(), bank.labels, queries.last(), queries.labels)["top1"]

    whole, sharded = report["whole"], report["sharded"]
    assert whole["returned"] == [pytest.approx(expected), None]  # the figure on the main process only
    assert whole["images"] == [256 + 23, 300 - 256]  # bank: a batch each; queries: one batch, the main's
    assert sharded["returned"] == [pytest.approx(expected), None]
    assert sharded["images"] == [0, 0]  # the main process ran the gathered copy, not the sharded model
