"""Where evaluation work runs: the device, the autocast dtype, DataLoader workers, and the processes that
share an extraction under ``accelerate launch``.

Several processes are used only when a distributed launch set them up (``WORLD_SIZE > 1``, or a process group
already initialised, as in a training script); Accelerate is imported only then, so single-process evaluation
does not need it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Names accepted by ``--dtype`` / ``dtype=``: the precision of the forward pass (autocast) and of kNN."""


def available_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_num_workers(processes_per_machine: int = 1) -> int:
    """DataLoader workers per process: the cores left after one per process, shared; between 1 and 8."""
    return max(1, min(8, available_cores() // max(1, processes_per_machine) - 1))


def as_dtype(dtype: str | torch.dtype | None, flag: str = "dtype") -> torch.dtype | None:
    """``dtype`` as a torch dtype (None stays None); a ``ValueError`` naming ``flag`` and the choices else."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"{flag} must be one of {', '.join(DTYPES)}; got {dtype!r}")


def as_device(device: str | torch.device | None, flag: str = "device") -> torch.device | None:
    """``device`` as a ``torch.device``: None stays None, ``"auto"`` is :func:`default_device`; a CUDA device
    that this machine lacks is refused in one line naming ``flag``."""
    if device is None:
        return None
    if device == "auto":
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{flag} must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device}: CUDA is not available on this machine; use {flag} cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), 0-based"
            )
    return resolved


def add_device_argument(parser) -> None:
    """``--device`` for a command that runs a model: ``auto`` (CUDA when available), or any torch device."""
    parser.add_argument(
        "--device",
        default="auto",
        help="'auto' (CUDA when available, the default), 'cpu', 'cuda' or 'cuda:N'",
    )


def default_device() -> torch.device:
    """This process's accelerator: its own GPU under a distributed launch, else ``cuda`` when available,
    else the CPU."""
    processes = current_processes()
    if processes.state is not None:
        return processes.state.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device`` for half precisions; nothing for float32 or None."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class Processes:
    """The processes sharing a piece of work: ``count`` of them, this one being ``index`` (0 is the main one).

    ``state`` is Accelerate's ``PartialState`` when there are several, else None.
    """

    count: int = 1
    index: int = 0
    state: Any = None

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def gather_to_main(self, value: Any) -> list[Any] | None:
        """Every process's ``value`` (any picklable object), in process order, on the main process; None on
        the others. Every process must call it."""
        if self.count == 1:
            return [value]
        import torch.distributed as dist

        gathered = [None] * self.count if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def broadcast_from_main(self, value: Any) -> Any:
        """The main process's ``value`` on every process. Every process must call it."""
        if self.count == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def main_process_first(self) -> contextlib.AbstractContextManager:
        """A block the main process runs first and the others after it (downloads, dataset caches)."""
        return self.state.main_process_first() if self.state is not None else contextlib.nullcontext()


def current_processes(split: bool | None = None) -> Processes:
    """The processes to split work between: one, unless ``split`` is not False and a distributed launch
    (``accelerate launch`` with several processes, torchrun, a training script's Accelerator) is running."""
    if split is False:
        return Processes()
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not initialised:
        return Processes()
    from accelerate import PartialState

    on_cpu = (
        os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        or not torch.cuda.is_available()
    )
    state = PartialState(cpu=on_cpu)  # an already initialised state (a training script's) is kept as it is
    if state.num_processes <= 1:
        return Processes()
    return Processes(state.num_processes, state.process_index, state)
