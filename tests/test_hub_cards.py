"""The model cards the training scripts write: their "How to load" code runs as printed against the saved
folder, from another working directory, and their metadata carry a licence and a pipeline tag that fits."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from hf_resdecay.hub import card_model_id, check_license

from .training_scripts.launch import launch, run_in_process
from .training_scripts.test_train_diffusion import QUICK, UNET
from .training_scripts.test_train_mae import TINY
from .without_package import run_without_package


def how_to_load(card: ModelCard) -> list[str]:
    """The Python blocks of the card's "How to load" section, in order."""
    section = card.text.split("## How to load", 1)[1]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def run_elsewhere(code: str, cwd: Path) -> str:
    """Run ``code`` as it is in a fresh interpreter whose working directory is ``cwd``; its stdout."""
    cwd.mkdir(exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_mae_card_loads_from_its_folder_and_names_licence_and_task(tmp_path):
    out = tmp_path / "runs" / "vitmae-decay"
    launch("train_mae.py", [*TINY, "--output_dir", str(out), "--max_train_steps", "4", "--eval_every", "0"])
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "image-feature-extraction"
    with_package, without_package = how_to_load(card)
    assert f'from_pretrained("{out.resolve()}")' in with_package  # a path that loads, not "vitmae-decay"
    # As printed, from another folder; then the pipeline the tag names, on the same checkpoint.
    check = with_package + textwrap.dedent(
        f"""
        from PIL import Image
        from transformers import pipeline
        features = pipeline("{card.data.pipeline_tag}", model="{out.resolve()}")(Image.new("RGB", (16, 16)))
        print(type(encoder).__name__, type(mae).__name__, len(features[0][0]) == encoder.config.hidden_size)
        """
    )
    assert run_elsewhere(check, tmp_path / "elsewhere").split() == [
        "ViTMAEDecayModel",
        "ViTMAEDecayForPreTraining",
        "True",
    ]
    printed = run_without_package(without_package + "\nprint(type(encoder).__name__)\n").stdout
    assert printed.split() == ["ViTMAEDecayModel"]


def test_diffusion_card_loads_from_its_folder_and_names_licence_and_task(tmp_path):
    out = tmp_path / "unet-decay"
    args = [*UNET, *QUICK, "--output_dir", str(out), "--max_train_steps", "2", "--sample_every", "0"]
    launch("train_diffusion.py", [*args, "--license", "mit"])
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit" and card.data.pipeline_tag == "unconditional-image-generation"
    model_code, pipeline_code = how_to_load(card)
    assert "snapshot_download" not in pipeline_code  # a local folder is loaded as it is
    check = (
        model_code
        + pipeline_code
        + "print(type(model).__name__, tuple(images.shape), type(pipeline.unet).__name__)"
    )
    assert run_elsewhere(check, tmp_path / "elsewhere").split() == [
        "UNet2DDecayModel",
        "(16,",
        "1,",
        "16,",
        "16)",
        "UNet2DDecayModel",
    ]


def test_the_card_names_the_hub_repo_only_when_the_run_pushes_there(tmp_path):
    assert card_model_id(tmp_path / "run", "org/model", push_to_hub=True) == "org/model"
    assert card_model_id(tmp_path / "run", "org/model", push_to_hub=False) == str(
        (tmp_path / "run").resolve()
    )
    relative = Path(os.path.relpath(tmp_path / "run"))
    assert card_model_id(relative, None, push_to_hub=False) == str((tmp_path / "run").resolve())


@pytest.mark.parametrize("license", ["apache-2.0", "mit", "cc-by-nc-4.0", "other", "openrail++"])
def test_hub_licence_ids_pass(license):
    check_license(license)


def test_a_licence_not_written_as_a_hub_id_stops_the_run_before_training(tmp_path):
    result = run_in_process(
        "train_mae.py", [*TINY, "--output_dir", str(tmp_path / "bad"), "--license", "Apache 2"]
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "--license must be a Hub licence identifier" in result.stderr and "'Apache 2'" in result.stderr
    assert not (tmp_path / "bad").exists()
