"""Remote code: the decayed UNet loaded by diffusers' AutoModel where hf_resdecay cannot be imported."""

import textwrap

import pytest
import torch
from diffusers import AutoModel, DDPMPipeline, DDPMScheduler
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file

from hf_resdecay import UNet2DDecayModel

from ...without_package import run_without_package
from .helpers import TINY

# Runs in a fresh interpreter where `import hf_resdecay` fails: only the files saved with the checkpoint
# can provide the class. Writes the outputs to a safetensors file.
WITHOUT_PACKAGE = textwrap.dedent(
    """
    import json
    import torch
    from diffusers import AutoModel, DDPMPipeline
    from safetensors.torch import load_file, save_file

    checkpoint, pipeline_dir, inputs_path, outputs_path = sys.argv[1:5]
    inputs = load_file(inputs_path)
    try:
        AutoModel.from_pretrained(checkpoint)
    except ValueError as error:
        assert "trust_remote_code" in str(error), error
    else:
        raise SystemExit("remote code ran without trust_remote_code=True")
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    assert type(model).__name__ == "UNet2DDecayModel", type(model)
    assert not type(model).__module__.startswith("hf_resdecay"), type(model).__module__

    # model_index.json names the module hf_resdecay.models.unet_2d_decay: diffusers cannot resolve it here
    try:
        DDPMPipeline.from_pretrained(pipeline_dir)
    except ValueError as error:
        assert "hf_resdecay.models.unet_2d_decay" in str(error), error
    else:
        raise SystemExit("the pipeline loaded without its module")
    # naming the code file in unet/ instead makes diffusers load it as remote code
    index_path = pipeline_dir + "/model_index.json"
    index = json.load(open(index_path))
    index["unet"] = ["unet_2d_decay", "UNet2DDecayModel"]
    json.dump(index, open(index_path, "w"))
    pipeline = DDPMPipeline.from_pretrained(pipeline_dir, trust_remote_code=True)

    with torch.no_grad():
        sample = model(inputs["sample"], inputs["timestep"]).sample
        pipeline_sample = pipeline.unet(inputs["sample"], inputs["timestep"]).sample
    save_file(
        {
            "sample": sample.contiguous(),
            "pipeline_sample": pipeline_sample.contiguous(),
            "alphas": torch.tensor(model.shortcut_coefficients, dtype=torch.float64),
        },
        outputs_path,
    )
    """
)


def _model() -> UNet2DDecayModel:
    torch.manual_seed(0)
    return UNet2DDecayModel(**TINY, shortcut_decay=0.35).eval()


def _inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"sample": torch.randn(2, 3, 16, 16, generator=generator), "timestep": torch.tensor([2, 9])}


def test_remote_code_without_the_package(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "checkpoint")
    DDPMPipeline(unet=model, scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(
        tmp_path / "pipeline"
    )
    inputs = _inputs()
    save_file(inputs, tmp_path / "inputs.safetensors")
    run_without_package(
        WITHOUT_PACKAGE,
        str(tmp_path / "checkpoint"),
        str(tmp_path / "pipeline"),
        str(tmp_path / "inputs.safetensors"),
        str(tmp_path / "out.safetensors"),
    )
    got = load_file(tmp_path / "out.safetensors")
    with torch.no_grad():
        expected = model(**inputs).sample
    torch.testing.assert_close(got["sample"], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(got["pipeline_sample"], expected, atol=1e-6, rtol=0)
    assert got["alphas"].tolist() == model.shortcut_coefficients


@pytest.mark.usefixtures("hub_server")
def test_push_to_hub_then_load():
    model = _model()
    model.push_to_hub("org/unet-decay")
    files = set(HfApi().list_repo_files("org/unet-decay"))
    assert {"config.json", "diffusion_pytorch_model.safetensors", "unet_2d_decay.py", "shortcut.py"} <= files

    inputs = _inputs()
    with torch.no_grad():
        expected = model(**inputs).sample
        direct = UNet2DDecayModel.from_pretrained("org/unet-decay")
        assert type(direct) is UNet2DDecayModel
        torch.testing.assert_close(direct(**inputs).sample, expected)
        # diffusers' AutoModel asks for trust_remote_code whenever auto_map is present, package or not
        with pytest.raises(ValueError, match="trust_remote_code"):
            AutoModel.from_pretrained("org/unet-decay")
        remote = AutoModel.from_pretrained("org/unet-decay", trust_remote_code=True)
        assert type(remote).__name__ == "UNet2DDecayModel" and type(remote) is not UNet2DDecayModel
        torch.testing.assert_close(remote(**inputs).sample, expected)
