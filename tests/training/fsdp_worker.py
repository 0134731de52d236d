"""Run by ``torchrun --nproc_per_node 2`` from test_distributed.py: a decayed ViTMAE sharded with FSDP2's
``fully_shard`` over two CPU processes (gloo), trained one step; then every piece of the training scripts
that runs on one process is checked against the whole model. Prints ``OK <rank>`` when every check held."""

import sys

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch.distributed.fsdp import fully_shard

from hf_resdecay import ViTMAEDecayConfig, ViTMAEDecayForPreTraining
from hf_resdecay.training import (
    full_state_dict,
    is_sharded,
    make_ema,
    parameter_groups,
    stop_if_diverged,
    unsharded_model,
)

TINY = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
TINY |= dict(intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1)
TINY |= dict(decoder_num_attention_heads=2, decoder_intermediate_size=32)


def main(output: str) -> None:
    accelerator = Accelerator()
    assert accelerator.num_processes == 2, accelerator.num_processes
    torch.manual_seed(0)  # the same initial weights on both ranks
    model = ViTMAEDecayForPreTraining(ViTMAEDecayConfig(**TINY))
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for layer in model.vit.layers:
        fully_shard(layer)
    fully_shard(model)
    assert is_sharded(model)
    ema = make_ema(model.parameters(), 0.9, accelerator.device)

    optimizer = torch.optim.AdamW(parameter_groups(model, 0.05), lr=1e-2)
    pixels = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(accelerator.process_index))
    model(pixel_values=pixels).loss.backward()
    optimizer.step()
    ema.step(model.parameters())
    stop_if_diverged(accelerator, 1, 1e-2, "--lr", parameters=model.parameters())  # DTensors: no exit

    gathered = full_state_dict(accelerator, model)
    evaluated = unsharded_model(accelerator, model)  # a collective, like the monitor and the final save
    if accelerator.is_main_process:
        assert not is_sharded(evaluated) and type(evaluated) is ViTMAEDecayForPreTraining
        whole = evaluated.state_dict()
        assert whole.keys() == initial.keys()
        changed = [name for name in whole if not torch.equal(whole[name], initial[name])]
        assert changed, "one optimizer step changed no weight"
        for name, tensor in whole.items():
            assert tensor.shape == initial[name].shape, name
            assert torch.equal(tensor.cpu(), gathered[name]), name
        noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(1))
        sample = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
        reference = ViTMAEDecayForPreTraining(ViTMAEDecayConfig(**TINY))
        reference.load_state_dict(gathered)
        reference.eval()
        expected = reference(pixel_values=sample, noise=noise).loss
        assert torch.equal(evaluated(pixel_values=sample, noise=noise).loss, expected)
        evaluated.save_pretrained(output)
        reloaded = ViTMAEDecayForPreTraining.from_pretrained(output).state_dict()
        for name, tensor in whole.items():
            assert torch.equal(reloaded[name], tensor), name
    else:
        assert gathered is None and evaluated is None

    # The sharded average equals the average of the whole weights over the same two points.
    ema.copy_to(model.parameters())
    averaged = full_state_dict(accelerator, model)
    if accelerator.is_main_process:
        plain = ViTMAEDecayForPreTraining(ViTMAEDecayConfig(**TINY))
        plain.load_state_dict(initial)
        expected_ema = EMAModel(list(plain.parameters()), decay=0.9)
        plain.load_state_dict(gathered)
        expected_ema.step(plain.parameters())
        expected_ema.copy_to(plain.parameters())
        for name, tensor in plain.state_dict().items():
            torch.testing.assert_close(averaged[name], tensor, rtol=0, atol=1e-7, msg=name)
    accelerator.wait_for_everyone()
    print(f"OK {accelerator.process_index}", flush=True)
    torch.distributed.destroy_process_group()  # before the interpreter tears gloo's threads down


if __name__ == "__main__":
    main(sys.argv[1])
