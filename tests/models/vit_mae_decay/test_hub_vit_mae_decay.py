"""Auto classes, remote code and the Hub, driven over real HTTP against the local Hub server."""

import json
import textwrap

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_PRETRAINING_MAPPING, MODEL_MAPPING

from hf_resdecay import ViTMAEDecayConfig, ViTMAEDecayForPreTraining, ViTMAEDecayModel

from ...without_package import run_without_package
from .helpers import TINY

# Runs in a fresh interpreter where `import hf_resdecay` fails: only the files saved with the checkpoint
# can provide the classes. Writes the outputs of both Auto classes to a safetensors file.
WITHOUT_PACKAGE = textwrap.dedent(
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoModelForPreTraining

    source, inputs_path, outputs_path = sys.argv[1:4]
    inputs = load_file(inputs_path)
    try:
        AutoModel.from_pretrained(source)
    except ValueError as error:
        assert "trust_remote_code" in str(error), error
    else:
        raise SystemExit("remote code ran without trust_remote_code=True")
    pretraining = AutoModelForPreTraining.from_pretrained(source, trust_remote_code=True).eval()
    encoder = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
    assert type(pretraining).__name__ == "ViTMAEDecayForPreTraining", type(pretraining)
    assert type(encoder).__name__ == "ViTMAEDecayModel", type(encoder)
    assert not type(encoder).__module__.startswith("hf_resdecay")
    out = pretraining(inputs["pixel_values"], noise=inputs["noise"])
    features = encoder(inputs["pixel_values"], noise=inputs["noise"]).last_hidden_state
    save_file(
        {
            "logits": out.logits.contiguous(),
            "loss": out.loss.reshape(1),
            "features": features.contiguous(),
            "alphas": torch.tensor(encoder.shortcut_coefficients, dtype=torch.float64),
        },
        outputs_path,
    )
    """
).replace("from safetensors.torch", "import torch\nfrom safetensors.torch")


def _model() -> ViTMAEDecayForPreTraining:
    torch.manual_seed(0)
    config = ViTMAEDecayConfig(**TINY, shortcut_decay=0.35, zero_init_residual_branches=False)
    return ViTMAEDecayForPreTraining(config).eval()


def _run_without_package(source: str, tmp_path, pixel_values, noise) -> dict[str, torch.Tensor]:
    save_file({"pixel_values": pixel_values, "noise": noise}, tmp_path / "inputs.safetensors")
    run_without_package(
        WITHOUT_PACKAGE,
        source,
        tmp_path / "inputs.safetensors",
        tmp_path / "out.safetensors",
        env={"HF_HUB_OFFLINE": "0"},
    )
    return load_file(tmp_path / "out.safetensors")


def _assert_same_outputs(got: dict, model: ViTMAEDecayForPreTraining, pixel_values, noise) -> None:
    with torch.no_grad():
        expected = model(pixel_values, noise=noise)
        features = model.vit(pixel_values, noise=noise).last_hidden_state
    torch.testing.assert_close(got["logits"], expected.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(got["loss"][0], expected.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(got["features"], features, atol=1e-6, rtol=0)
    assert got["alphas"].tolist() == model.shortcut_coefficients


def test_import_registers_the_auto_classes():
    assert CONFIG_MAPPING["vit_mae_decay"] is ViTMAEDecayConfig
    assert MODEL_MAPPING[ViTMAEDecayConfig] is ViTMAEDecayModel
    assert MODEL_FOR_PRETRAINING_MAPPING[ViTMAEDecayConfig] is ViTMAEDecayForPreTraining
    config = AutoConfig.for_model("vit_mae_decay", **TINY)
    assert type(AutoModel.from_config(config)) is ViTMAEDecayModel
    assert type(AutoModelForPreTraining.from_config(config)) is ViTMAEDecayForPreTraining


def test_saved_config_carries_auto_map(tmp_path):
    _model().save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_vit_mae_decay.ViTMAEDecayConfig",
        "AutoModel": "modeling_vit_mae_decay.ViTMAEDecayModel",
        "AutoModelForPreTraining": "modeling_vit_mae_decay.ViTMAEDecayForPreTraining",
    }


def test_remote_code_from_a_local_folder_without_the_package(tmp_path, pixel_values, noise):
    model = _model()
    model.save_pretrained(tmp_path / "checkpoint")
    got = _run_without_package(str(tmp_path / "checkpoint"), tmp_path, pixel_values, noise)
    _assert_same_outputs(got, model, pixel_values, noise)


@pytest.mark.usefixtures("hub_server")
def test_push_to_hub_then_load_with_and_without_the_package(tmp_path, pixel_values, noise):
    model = _model()
    model.push_to_hub("org/vitmae-decay")
    files = set(HfApi().list_repo_files("org/vitmae-decay"))
    assert {"config.json", "model.safetensors", "modeling_vit_mae_decay.py", "shortcut.py"} <= files

    loaded = AutoModel.from_pretrained("org/vitmae-decay").eval()
    assert type(loaded) is ViTMAEDecayModel
    torch.testing.assert_close(
        loaded(pixel_values, noise=noise).last_hidden_state,
        model.vit(pixel_values, noise=noise).last_hidden_state,
    )
    pretraining = AutoModelForPreTraining.from_pretrained("org/vitmae-decay").eval()
    torch.testing.assert_close(
        pretraining(pixel_values, noise=noise).logits, model(pixel_values, noise=noise).logits
    )

    got = _run_without_package("org/vitmae-decay", tmp_path, pixel_values, noise)
    _assert_same_outputs(got, model, pixel_values, noise)


@pytest.mark.usefixtures("hub_server")
def test_revisions_on_the_hub(pixel_values, noise):
    first = _model()
    first.push_to_hub("org/vitmae-decay-revisions")
    first_commit = HfApi().list_repo_commits("org/vitmae-decay-revisions")[0].commit_id
    second = ViTMAEDecayForPreTraining(ViTMAEDecayConfig(**TINY, shortcut_decay=0.1)).eval()
    second.push_to_hub("org/vitmae-decay-revisions")

    latest = AutoModelForPreTraining.from_pretrained("org/vitmae-decay-revisions")
    assert latest.config.shortcut_decay == 0.1
    pinned = AutoModelForPreTraining.from_pretrained(
        "org/vitmae-decay-revisions", revision=first_commit
    ).eval()
    assert pinned.config.shortcut_decay == 0.35
    torch.testing.assert_close(
        pinned(pixel_values, noise=noise).logits, first(pixel_values, noise=noise).logits
    )
