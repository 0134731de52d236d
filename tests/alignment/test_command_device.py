"""``hf-resdecay align --device`` and ``run_alignment(device=...)``: the analysis runs where it is told."""

import json

import pytest
import torch
from transformers import ViTImageProcessorPil

from hf_resdecay import ViTMAEDecayConfig, ViTMAEDecayForPreTraining
from hf_resdecay.cli import main

from .conftest import MAE_DECODER, VIT, randomize


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = ViTMAEDecayConfig(**{**VIT, "image_size": 16, "patch_size": 4}, **MAE_DECODER)
    folder = tmp_path_factory.mktemp("model")
    randomize(ViTMAEDecayForPreTraining(config)).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


def test_device_flag_gives_the_default_report_and_refuses_a_missing_gpu(
    checkpoint, digits_dataset, tmp_path, capsys
):
    digits_dataset.save_to_disk(tmp_path / "digits")
    args = ["align", str(checkpoint), "--dataset", str(tmp_path / "digits"), "--samples", "3", "--top-k", "2"]
    args += ["--no-progress", "--seed", "1"]
    assert main([*args, "--output", str(tmp_path / "auto")]) == 0
    assert main([*args, "--device", "cpu", "--output", str(tmp_path / "cpu")]) == 0
    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("auto", "cpu")]
    if not torch.cuda.is_available():  # "auto" ran on the CPU too: the very same numbers
        assert [block["singular_values"] for block in reports[0]["blocks"]] == [
            block["singular_values"] for block in reports[1]["blocks"]
        ]
        capsys.readouterr()
        assert main([*args, "--device", "cuda", "--output", str(tmp_path / "never")]) == 2
        assert (
            "--device cuda: CUDA is not available on this machine; use --device cpu"
            in capsys.readouterr().err
        )
        assert not (tmp_path / "never").exists()
