"""What must hold on sharded models too: gathering whole weights, a copy one process can run alone, the
dtype a prepared model takes its inputs in, and the moving average kept on the model's device.

Under FSDP (``fully_shard``) each process holds a slice of every parameter (a ``DTensor``), and every forward
pass is a collective: one process cannot run the model, and ``save_pretrained`` on it would write slices. Work
that runs on the main process alone (the kNN monitor, the final save, sample grids) therefore runs on
:func:`unsharded_model`, which every process calls and which gathers the weights when they are sharded.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def is_dtensor(value: object) -> bool:
    """Whether ``value`` is a distributed tensor (a ``DTensor``: one slice per process under FSDP2)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as this process holds it: the local slice of a ``DTensor``, else the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a slice of a distributed tensor (FSDP2's ``fully_shard``)."""
    return any(is_dtensor(p) for p in model.parameters())


def local_tensors(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor as this process holds it (:func:`local_tensor`)."""
    return [local_tensor(tensor) for tensor in tensors]


def full_state_dict(accelerator, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole state dict of a prepared ``model`` on the main process (None on the others).

    Every process must call it: with FSDP or DeepSpeed ZeRO-3 it gathers the slices (a collective). Sharded
    weights arrive on the CPU; whole weights are returned as the model holds them (no copy).
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        state = accelerator.get_state_dict(model)
    elif is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
    else:
        state = accelerator.unwrap_model(model, keep_torch_compile=False).state_dict()
    return state if accelerator.is_main_process else None


def model_class(model: nn.Module) -> type[nn.Module]:
    """The model's own class, behind the subclass that ``fully_shard`` creates (``FSDP<Name>``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(kind for kind in type(model).__mro__ if not issubclass(kind, FSDPModule))


def unsharded_model(accelerator, model: nn.Module) -> nn.Module | None:
    """A model the main process can run and save alone (None on the others); every process must call it.

    With whole weights (one process, DDP) it is the unwrapped model itself. With sharded weights it is a new
    instance of the same class and config holding the gathered weights, on the accelerator's device, in eval
    mode: changing it does not change the model being trained.
    """
    from accelerate.utils import DistributedType

    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    sharded = accelerator.distributed_type == DistributedType.DEEPSPEED or is_sharded(unwrapped)
    if not sharded:
        return unwrapped if accelerator.is_main_process else None
    state = full_state_dict(accelerator, model)
    if not accelerator.is_main_process:
        return None
    kind = model_class(unwrapped)
    copy = kind.from_config(unwrapped.config) if hasattr(kind, "from_config") else kind(unwrapped.config)
    copy.load_state_dict(state)
    return copy.to(accelerator.device).eval()


def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a prepared model takes float inputs in: that of its weights.

    Under autocast (DDP, FSDP) the weights stay float32 and so do the inputs; DeepSpeed's bf16/fp16 engines
    hold half-precision weights and refuse float32 inputs.
    """
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def make_ema(parameters: Iterable[torch.nn.Parameter], decay: float, device: torch.device | str):
    """diffusers' ``EMAModel`` over ``parameters`` (after ``accelerator.prepare``, so sharded parameters get
    sharded averages), kept on ``device``: the step then never copies weights between devices."""
    from diffusers.training_utils import EMAModel

    ema = EMAModel(list(parameters), decay=decay)
    ema.to(device)
    return ema
