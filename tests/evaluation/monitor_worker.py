"""Run by ``torchrun --nproc_per_node 2`` from test_distributed_extraction.py: train_mae.py's kNN monitor on
two CPU processes (gloo), for a whole model under DDP (each process extracts its share of the images) and
for an FSDP2-sharded one (the main process extracts alone from the gathered copy). The main process writes
what each process returned and how many images each one's encoder saw to ``monitor.json``."""

import importlib.util
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from datasets import load_from_disk
from torch.distributed.fsdp import fully_shard
from transformers import ViTImageProcessorPil

from hf_resdecay import ViTMAEDecayForPreTraining
from hf_resdecay.training import unsharded_model

SCRIPT = Path(__file__).resolve().parents[2] / "training_scripts" / "train_mae.py"


def _train_mae():
    spec = importlib.util.spec_from_file_location("train_mae", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_mae"] = module
    spec.loader.exec_module(module)
    return module


def _counted(model: ViTMAEDecayForPreTraining, seen: list[int]) -> ViTMAEDecayForPreTraining:
    """The model, its encoder adding the number of images of every forward pass to ``seen``."""
    model.vit.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(len(kwargs["pixel_values"])), with_kwargs=True
    )
    return model


def main(model_dir: str, data_dir: str, output: str) -> None:
    accelerator = Accelerator()
    assert accelerator.num_processes == 2, accelerator.num_processes
    monitor = _train_mae().knn_monitor
    data = load_from_disk(data_dir)
    processor = ViTImageProcessorPil.from_pretrained(model_dir)
    report = {}

    seen: list[int] = []
    model = accelerator.prepare(_counted(ViTMAEDecayForPreTraining.from_pretrained(model_dir), seen))
    top1 = monitor(
        accelerator, model, unsharded_model(accelerator, model), processor, data["train"], data["test"],
        "image", "label",
    )  # fmt: skip
    report["whole"] = {"returned": gather_object([top1]), "images": gather_object([sum(seen)])}

    seen = []
    sharded = _counted(ViTMAEDecayForPreTraining.from_pretrained(model_dir), seen)
    for layer in sharded.vit.layers:
        fully_shard(layer)
    fully_shard(sharded)
    top1 = monitor(
        accelerator, sharded, unsharded_model(accelerator, sharded), processor, data["train"], data["test"],
        "image", "label",
    )  # fmt: skip
    report["sharded"] = {"returned": gather_object([top1]), "images": gather_object([sum(seen)])}
    if accelerator.is_main_process:
        Path(output).write_text(json.dumps(report))
    accelerator.wait_for_everyone()
    # Tear gloo down before the interpreter does: its threads, left joinable at exit, abort the process.
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
