"""The pieces that must work on sharded models (hf_resdecay.training.distributed), on two CPU processes.

Accelerate runs FSDP on GPUs only, so the test shards with FSDP2's own ``fully_shard`` over gloo, the same
DTensor parameters Accelerate's FSDP2 plugin produces, and drives the functions the training scripts call.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_resdecay import ViTMAEDecayConfig, ViTMAEDecayForPreTraining
from hf_resdecay.training import input_dtype, is_sharded, make_ema

WORKER = Path(__file__).with_name("fsdp_worker.py")


def test_gathering_evaluating_saving_and_averaging_a_sharded_model(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(WORKER), str(tmp_path / "saved")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "ACCELERATE_USE_CPU": "1"},  # Accelerate's multi-CPU state over torchrun's gloo
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert sorted(re.findall(r"OK \d", result.stdout)) == ["OK 0", "OK 1"]  # every check held on both ranks
    assert (tmp_path / "saved" / "model.safetensors").exists()


def _tiny() -> ViTMAEDecayForPreTraining:
    config = ViTMAEDecayConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2, decoder_intermediate_size=32,
    )  # fmt: skip
    return ViTMAEDecayForPreTraining(config)


def test_a_whole_model_is_not_sharded_and_inputs_follow_the_weights_dtype():
    model = _tiny()
    assert not is_sharded(model)
    assert input_dtype(model) == torch.float32
    model.to(torch.bfloat16)  # as DeepSpeed's bf16 engine holds it
    assert input_dtype(model) == torch.bfloat16
    pixels = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="bfloat16"):  # what DeepSpeed's bf16 step met before the cast
        model(pixel_values=pixels)
    assert torch.isfinite(model(pixel_values=pixels.to(input_dtype(model))).loss)


def test_the_moving_average_lives_on_the_models_device():
    with torch.device("meta"):
        model = _tiny()
    ema = make_ema(model.parameters(), 0.99, "meta")
    assert {tensor.device.type for tensor in ema.shadow_params} == {"meta"}
    cpu_model = _tiny()
    ema = make_ema(cpu_model.parameters(), 0.99, torch.device("cpu"))
    assert {tensor.device.type for tensor in ema.shadow_params} == {"cpu"}
    assert len(ema.shadow_params) == len(list(cpu_model.parameters()))


def test_the_fsdp_config_wraps_the_blocks_of_every_model_family():
    """training_scripts/configs/fsdp.yaml names no classes: Accelerate wraps what each model lists in
    ``_no_split_modules``, and refuses a name the model does not contain."""
    from accelerate.utils.dataclasses import get_module_class_from_name

    from hf_resdecay import DiTDecayTransformer2DModel, UNet2DDecayModel

    config_text = (Path(__file__).parents[2] / "training_scripts" / "configs" / "fsdp.yaml").read_text()
    assert "fsdp_transformer_layer_cls_to_wrap" not in config_text
    models = [
        _tiny(),
        DiTDecayTransformer2DModel(
            sample_size=8, in_channels=1, num_layers=2, num_attention_heads=2, attention_head_dim=8,
            patch_size=2, num_embeds_ada_norm=3,
        ),
        UNet2DDecayModel(
            sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
        ),
    ]  # fmt: skip
    for model in models:
        names = list(model._no_split_modules)
        assert names, type(model).__name__
        counts = []
        for name in names:
            found = get_module_class_from_name(model, name)
            assert found is not None, (type(model).__name__, name)
            counts.append(sum(isinstance(module, found) for module in model.modules()))
        assert max(counts) >= 2, (type(model).__name__, counts)  # shards per block, not one for all
