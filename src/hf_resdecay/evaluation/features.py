"""Frozen features of any transformers vision model over an image dataset, per layer, cached on disk.

Works on ViT-family encoders (ViT, DeiT, DINOv2, ViTMAE and the decayed ViTMAE) and on CNNs with a
pooler (ResNet, ConvNeXt). ViTMAE checkpoints are read with masking off and patch order kept, so every
patch is seen. Layers index ``hidden_states``: 0 is the embedding output, ``i`` the output of block ``i``,
``-1`` the last block (:func:`resolve_layers`); no final LayerNorm is applied (the decay paper's linear-probe
protocol).

At scale: images are decoded and preprocessed in DataLoader workers, the model runs on ``device`` (CUDA when
available) under optional autocast, and under ``accelerate launch`` each process extracts every n-th batch,
the main process writing the rows in dataset order. Features stream into one ``.npy`` file per layer (the
disk cache entry), memory-mapped when read: no layer is ever held twice or concatenated in memory.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModel, PreTrainedModel, ViTImageProcessorPil

from ..assets import default_cache_dir, sha256_of
from ..atomic import write_json_atomic
from ..data import find_image_column, find_label_column
from ._runtime import as_device, as_dtype, autocast, available_cores, current_processes, default_num_workers

logger = logging.getLogger(__name__)

POOLINGS = ("mean", "cls", "pooler")
CACHE_FORMAT = 2
"""Version of the cache layout (2: a folder of per-layer ``.npy`` files); part of every entry's key."""


class LayerFiles(Mapping):
    """Per-layer features stored as ``layer_<i>.npy`` files in ``folder``, memory-mapped on each access: only
    the rows actually read come into memory, and dropping the array releases them."""

    def __init__(self, folder: str | os.PathLike, layers: Sequence[int]):
        self.folder = Path(folder)
        self._layers = sorted(layers)

    def __getitem__(self, layer: int) -> np.ndarray:
        if layer not in self._layers:
            raise KeyError(layer)
        return np.load(self.folder / f"layer_{layer}.npy", mmap_mode="r")

    def __iter__(self) -> Iterator[int]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


@dataclass
class FeatureSet:
    """Pooled features per layer (``features[layer]`` is a float32 (samples, dim) array, memory-mapped when it
    comes from the disk cache) and labels.

    ``from_cache`` says whether they were read from a verified disk-cache entry rather than computed now.
    """

    features: Mapping[int, np.ndarray]
    labels: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    from_cache: bool = False

    @property
    def layers(self) -> list[int]:
        return sorted(self.features)

    def last(self) -> np.ndarray:
        """Features of the deepest layer that was extracted."""
        return self.features[self.layers[-1]]


def check_model_folder(folder: str | os.PathLike, config_name: str | None = "config.json") -> None:
    """Refuse a saved folder whose config or safetensors files are damaged, before any weights are read.

    ``config_name`` (required when given) must be a JSON object; every other ``config.json`` or
    ``scheduler_config.json`` present must parse too; every ``*.safetensors`` header must be intact and
    cover the whole file (a truncated or bit-flipped file fails here). Raises one-line ``ValueError``s that
    name the file and the fix. Reads headers only, so it costs milliseconds.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    if config_name is not None and not (folder / config_name).is_file():
        raise ValueError(
            f"{folder} has no {config_name}: not a saved checkpoint folder (save it with save_pretrained)"
        )
    names = {name for name in (config_name, "config.json", "scheduler_config.json") if name is not None}
    for path in sorted(folder / name for name in names):
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(
                f"{path} is not valid JSON ({error}); restore it or save the model again with save_pretrained"
            ) from None
        if not isinstance(config, dict):
            raise ValueError(f"{path} must hold a JSON object; restore it or save the model again")
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="np"):
                pass
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"{path} is damaged ({error}); download it again or re-save the model with save_pretrained"
            ) from None


def check_model_source(model: str | os.PathLike, pipeline: bool = False) -> None:
    """Refuse, in one line naming ``model`` and the fix, what cannot be a checkpoint before any loading.

    A folder must be an intact saved checkpoint (:func:`check_model_folder`; with ``pipeline``, a diffusers
    pipeline: ``model_index.json`` and each component folder); anything else must be a well-formed Hub id,
    so that a mistyped path is reported as a missing folder, not as a malformed repo id.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = str(model)
    folder = Path(text).expanduser()
    if folder.is_dir():
        if not pipeline:
            check_model_folder(folder)
            _check_model_type(folder / "config.json")
            return
        check_model_folder(folder, "model_index.json")
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        for component, entry in index.items():
            if isinstance(entry, list) and (folder / component).is_dir():
                check_model_folder(folder / component, config_name=None)
        return
    kind = "pipeline" if pipeline else "checkpoint"
    if folder.exists():
        raise ValueError(f"{text} is a file; give the {kind} folder that save_pretrained wrote, or a Hub id")
    try:
        validate_repo_id(text)
    except HFValidationError:
        raise ValueError(
            f"{text} does not exist: give an existing {kind} folder or a Hub id (namespace/name)"
        ) from None


def _check_model_type(config_path: Path) -> None:
    """transformers' Auto classes need ``model_type`` in ``config.json``; say so in one line."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if not isinstance(config.get("model_type"), str):
        raise ValueError(
            f"{config_path} has no model_type: not a transformers checkpoint; save the model with "
            "save_pretrained (a diffusers pipeline takes --metrics fid)"
        )


class _HideLoadReport(logging.Filter):
    """Drops transformers' many-row load report when it only lists unused or missing tensors (summarised in
    one line by :func:`_note_loading`); reports of size mismatches or conversion errors pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "LOAD REPORT" not in message or "MISMATCH" in message or "CONVERSION" in message


_NOTED_LOADS: set[tuple[str, str]] = set()


def _tensor_groups(names: Sequence[str]) -> str:
    """``decoder.*``-style summary of tensor names by their first component (with counts when several)."""
    groups: dict[str, int] = {}
    for name in names:
        groups[name.split(".")[0]] = groups.get(name.split(".")[0], 0) + 1
    if len(groups) == 1:
        return f"{next(iter(groups))}.*"
    return ", ".join(f"{head}.* ({count})" for head, count in sorted(groups.items()))


def _note_loading(source: str, model: torch.nn.Module, info: dict) -> None:
    """Say once per checkpoint and process, in one line each, which tensors were unused or missing."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    unused, missing = sorted(info.get("unexpected_keys") or ()), sorted(info.get("missing_keys") or ())
    kind = type(model).__name__
    if unused and (source, "unused") not in _NOTED_LOADS:
        _NOTED_LOADS.add((source, "unused"))
        what = (
            " (the pretraining decoder, not needed for features)"
            if all(name.startswith("decoder.") for name in unused)
            else ""
        )
        logger.warning(
            f"{source}: {len(unused)} tensors of the checkpoint ({_tensor_groups(unused)}) are not used by "
            f"{kind}{what}"
        )
    if missing and (source, "missing") not in _NOTED_LOADS:
        _NOTED_LOADS.add((source, "missing"))
        logger.warning(
            f"{source}: {len(missing)} tensors of {kind} are not in the checkpoint and were freshly "
            f"initialised: {_tensor_groups(missing)}"
        )


def load_model(
    model_or_id: torch.nn.Module | str | os.PathLike, trust_remote_code: bool = False, **kwargs
) -> torch.nn.Module:
    """``transformers.AutoModel.from_pretrained`` with this package's decayed models registered.

    A module is returned as given. Importing :mod:`hf_resdecay` registers ``vit_mae_decay`` with the Auto
    classes, so decayed checkpoints resolve without remote code; ``trust_remote_code`` stays off unless the
    caller turns it on. ``kwargs`` (``revision``, ``torch_dtype``, ...) go to ``from_pretrained``. Tensors of
    the checkpoint that the model does not use (a pretraining checkpoint's decoder, read as an encoder) are
    named in one line instead of transformers' one-row-per-tensor report.
    """
    if isinstance(model_or_id, torch.nn.Module):
        return model_or_id
    import hf_resdecay  # noqa: F401  (registers the decayed models with the Auto classes)

    reporter = logging.getLogger("transformers.modeling_utils")
    hide = _HideLoadReport()
    reporter.addFilter(hide)
    try:
        model, info = AutoModel.from_pretrained(
            str(model_or_id), trust_remote_code=trust_remote_code, output_loading_info=True, **kwargs
        )
    finally:
        reporter.removeFilter(hide)
    _note_loading(str(model_or_id), model, info)
    return model


def load_encoder(model_or_id, revision: str | None = None) -> tuple[PreTrainedModel, object | None]:
    """A model and its image processor (None when the checkpoint has none) from an object, Hub id or dir.

    A path or id is checked first (:func:`check_model_source`), and a model that still fails to load is
    reported as a one-line ``ValueError`` naming it.
    """
    if isinstance(model_or_id, torch.nn.Module):
        return model_or_id, None
    check_model_source(model_or_id)
    try:
        model = load_model(model_or_id, revision=revision)
    except OSError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"could not load the model {model_or_id} ({reason}); check the folder, or the Hub id and revision"
        ) from error
    try:
        processor = AutoImageProcessor.from_pretrained(model_or_id, revision=revision)
    except (OSError, ValueError):
        processor = None
    return model, processor


def default_image_processor(model: PreTrainedModel) -> ViTImageProcessorPil:
    """Resize to the model's image size and scale to [-1, 1], for checkpoints saved without a processor."""
    size = getattr(model.config, "image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return ViTImageProcessorPil(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


def resolve_layers(layers: Sequence[int] | str, num_layers: int) -> list[int]:
    """``layers`` (``"all"`` or ``hidden_states`` indices) as distinct non-negative indices, in given order.

    ``num_layers`` is the model's block count: 0 is the embedding output, ``num_layers`` the last block, and
    ``-1`` .. ``-(num_layers + 1)`` count from the end. Anything outside raises ``ValueError`` naming the
    valid range, rather than wrapping round to another layer.
    """
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be 'all' or a sequence of integers; got {layers!r}")
        return list(range(num_layers + 1))
    resolved = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise ValueError(f"layers must be 'all' or a sequence of integers; got {layer!r} in {layers!r}")
        if not -(num_layers + 1) <= layer <= num_layers:
            raise ValueError(
                f"layers: {layer} is out of range for a model with {num_layers} blocks; valid layers are 0 "
                f"(embeddings) to {num_layers} (the last block), or -{num_layers + 1} to -1 from the end"
            )
        resolved.append(int(layer) % (num_layers + 1))
    if not resolved:
        raise ValueError("layers must name at least one layer (0 = embeddings, -1 = the last block)")
    return list(dict.fromkeys(resolved))


def _num_layers(config) -> int | None:
    """How many blocks (transformers) or stages (CNNs) add a hidden state after the embeddings; None when
    the config does not say (the first batch's outputs tell)."""
    if isinstance(getattr(config, "num_hidden_layers", None), int):
        return config.num_hidden_layers
    depths = getattr(config, "depths", None)
    return len(depths) if isinstance(depths, (list, tuple)) else None


def _model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the config and every weight: two models share cached features only if identical
    (transformers and diffusers models alike; the latent and FID-batch caches use it too). Where the model
    was loaded from (``_name_or_path``) is left out, so a byte-identical copy of a checkpoint folder has the
    same fingerprint."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:  # a transformers config, or a diffusers FrozenDict
        settings = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        settings.pop("_name_or_path", None)
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


@contextlib.contextmanager
def _unmasked(model: torch.nn.Module) -> Iterator[bool]:
    """Set ``mask_ratio=0`` on ViTMAE-style encoders for the duration; yield whether the model masks."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "mask_ratio"):
        yield False
        return
    ratio = config.mask_ratio
    config.mask_ratio = 0.0
    try:
        yield True
    finally:
        config.mask_ratio = ratio


def _forward_kwargs(base: torch.nn.Module, masks_patches: bool, pixel_values: torch.Tensor) -> dict:
    """Ask for every hidden state; for masking models, identity noise (argsort keeps patches in order)."""
    kwargs: dict = {"output_hidden_states": True}
    if masks_patches:
        num_patches = base.embeddings.patch_embeddings.num_patches
        noise = torch.arange(num_patches, device=pixel_values.device, dtype=torch.float32)
        kwargs["noise"] = noise.expand(len(pixel_values), -1)
    return kwargs


def _pool(hidden: torch.Tensor, pooling: str) -> torch.Tensor:
    if hidden.ndim == 4:  # CNN feature map (batch, channels, height, width)
        if pooling == "cls":
            raise ValueError(
                "pooling='cls' needs a token sequence; this model gives feature maps (use 'mean')"
            )
        return hidden.mean(dim=(2, 3))
    return hidden[:, 0] if pooling == "cls" else hidden.mean(dim=1)


def _check_pooler_layers(pooling: str, indices: list[int], num_layers: int) -> None:
    if pooling == "pooler" and indices != [num_layers]:
        raise ValueError("pooling='pooler' reads the last layer only; use layers=(-1,)")


def _to_rgb(image, channels: int):
    if channels == 3 and hasattr(image, "mode") and image.mode != "RGB":
        return image.convert("RGB")
    return image


class _ImageBatches(torch.utils.data.Dataset):
    """Batches ``numbers`` of ``dataset`` (batch ``n`` holds rows ``n * batch_size`` onwards), each decoded
    and run through the image processor: DataLoader items, so that its workers do this beside the model."""

    def __init__(self, dataset, numbers, batch_size, total, image_column, label_column, processor, channels):
        self.dataset, self.numbers, self.batch_size, self.total = dataset, numbers, batch_size, total
        self.image_column, self.label_column = image_column, label_column
        self.processor, self.channels = processor, channels

    def __len__(self) -> int:
        return len(self.numbers)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor, list | None]:
        number = self.numbers[position]
        start = number * self.batch_size
        rows = self.dataset[start : min(start + self.batch_size, self.total)]
        images = [_to_rgb(image, self.channels) for image in rows[self.image_column]]
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        labels = list(rows[self.label_column]) if self.label_column is not None else None
        return number, pixel_values, labels


class _HashingFile:
    """A binary file that hashes (SHA-256) what is written to it, so an entry's checksum costs no re-read."""

    def __init__(self, path: Path):
        self.handle = open(path, "wb")  # noqa: SIM115  (closed by close(), after many writes)
        self.digest = hashlib.sha256()

    def write(self, data) -> None:
        self.digest.update(data)
        self.handle.write(data)

    def close(self) -> str:
        self.handle.close()
        return self.digest.hexdigest()


class _FeatureWriter:
    """Rows of each layer, appended in dataset order: streamed into ``layer_<i>.npy`` files in ``folder``
    (hashed as they are written), or without a folder into one array per layer allocated once."""

    def __init__(self, rows: int, folder: Path | None, label_column: str | None):
        self.rows, self.folder, self.label_column = rows, folder, label_column
        self.filled = 0
        self.outputs: dict[int, _HashingFile | np.ndarray] = {}
        self.labels = np.empty(rows, dtype=np.int64) if label_column is not None else None

    def append(self, pooled: dict[int, np.ndarray], labels: list | None) -> int:
        """Write the next rows; returns how many."""
        count = len(next(iter(pooled.values())))
        stop = self.filled + count
        for index, values in pooled.items():
            values = np.ascontiguousarray(values, dtype="<f4")
            output = self.outputs.get(index)
            if output is None:
                output = self.outputs[index] = self._open(index, values.shape[1])
            if isinstance(output, np.ndarray):
                output[self.filled : stop] = values
            else:
                output.write(values.data)
        if self.labels is not None:
            try:
                self.labels[self.filled : stop] = np.asarray(labels, dtype=np.int64)
            except (TypeError, ValueError):
                raise ValueError(
                    f"column {self.label_column!r} holds missing or non-integer labels in rows "
                    f"{self.filled}-{stop - 1}; give a labelled split or label_column=None"
                ) from None
        self.filled = stop
        return count

    def _open(self, index: int, dim: int) -> _HashingFile | np.ndarray:
        if self.folder is None:
            return np.empty((self.rows, dim), dtype=np.float32)
        file = _HashingFile(self.folder / f"layer_{index}.npy")
        header = {"descr": "<f4", "fortran_order": False, "shape": (self.rows, dim)}
        np.lib.format.write_array_header_1_0(file, header)
        return file

    def finish(self, meta: dict) -> tuple[dict[int, np.ndarray], dict[str, str]]:
        """In memory: the arrays and no hashes. On disk: no arrays, and the SHA-256 of every file written
        (the layers, ``labels.npy`` and ``meta.json``)."""
        if self.filled != self.rows:
            raise RuntimeError(f"feature extraction wrote {self.filled} of {self.rows} rows")
        if self.folder is None:
            return dict(self.outputs), {}
        hashes = {f"layer_{index}.npy": file.close() for index, file in self.outputs.items()}
        if self.labels is not None:
            file = _HashingFile(self.folder / "labels.npy")
            np.save(file, self.labels)
            hashes["labels.npy"] = file.close()
        file = _HashingFile(self.folder / "meta.json")
        file.write(json.dumps(meta).encode())
        hashes["meta.json"] = file.close()
        return {}, hashes

    def abort(self) -> None:
        for output in self.outputs.values():
            if isinstance(output, _HashingFile):
                output.handle.close()


def extract_features(
    model_or_id,
    dataset,
    pooling: str = "mean",
    layers: Sequence[int] | str = (-1,),
    batch_size: int = 64,
    image_processor=None,
    image_column: str | None = None,
    label_column: str | None = None,
    max_samples: int | None = None,
    revision: str | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    num_workers: int | None = None,
    split_between_processes: bool | None = None,
) -> FeatureSet | None:
    """Features of ``dataset`` (a ``datasets.Dataset`` with an image column) under ``model_or_id``.

    ``layers`` is a sequence of ``hidden_states`` indices or ``"all"`` (range-checked and de-duplicated by
    :func:`resolve_layers`, so ``(2, -1)`` on a 2-block model is layer 2 once); ``pooling`` is ``"mean"`` (all
    tokens, CLS included; spatial mean for CNNs), ``"cls"`` or ``"pooler"`` (the model's pooler output,
    last layer only).

    Where it runs: ``device`` (``"auto"``: CUDA when available; None: where a given module already is, else
    ``"auto"``; a given module is moved back afterwards), ``dtype`` (``"bfloat16"``/``"float16"``: autocast;
    features are stored as float32 either way), ``num_workers`` DataLoader workers decoding and preprocessing
    batches (default: the free cores, at most 8; 0 decodes in this process). Under a distributed launch
    (``accelerate launch``) every process must call it: each runs every n-th batch and the main process
    receives them in order and returns the features; the others return None. ``split_between_processes=False``
    keeps the work on the calling process alone.

    With ``cache``, results are stored under ``cache_dir`` keyed by the model's weights and config (not its
    path), the processor, the dataset's fingerprint, the layers, pooling and dtype: one ``.npy`` file per
    layer, written while extracting and memory-mapped when read, with the SHA-256 of each file recorded beside
    the entry. An entry that fails the check or cannot be read is logged, deleted and recomputed.
    ``cache=False`` recomputes: in memory (one array per layer, allocated once), or into the entry it replaces
    when one exists.
    ``FeatureSet.from_cache`` tells which happened.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(map(repr, POOLINGS))}; got {pooling!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
        raise ValueError(f"num_workers must be an integer >= 0; got {num_workers!r}")
    autocast_dtype = as_dtype(dtype)
    target = as_device(device)
    processes = current_processes(split_between_processes)
    given_module = isinstance(model_or_id, torch.nn.Module)
    model, loaded_processor = load_encoder(model_or_id, revision)
    processor = image_processor or loaded_processor or default_image_processor(model)
    image_column = find_image_column(dataset, image_column)
    label_column = label_column if label_column is not None else find_label_column(dataset)
    total = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    if total == 0:
        raise ValueError("the dataset is empty")
    base = model.base_model if isinstance(model, PreTrainedModel) else model
    as_given = layers if isinstance(layers, str) else list(layers)
    num_layers = _num_layers(getattr(base, "config", None))
    indices = resolve_layers(as_given, num_layers) if num_layers is not None else None
    if indices is not None:
        _check_pooler_layers(pooling, indices, num_layers)
    parameter = next(base.parameters(), None)
    weights_dtype = parameter.dtype if parameter is not None else torch.float32
    half = autocast_dtype is not None and autocast_dtype != torch.float32
    dtype_name = str(autocast_dtype if half else weights_dtype).removeprefix("torch.")  # what it computes in

    entry = key = None
    if getattr(dataset, "_fingerprint", None) is not None:
        cached = None
        if processes.is_main:
            key_parts = {
                "format": CACHE_FORMAT,
                "model": _model_fingerprint(model),
                "dataset": dataset._fingerprint,
                "processor": processor.to_json_string()
                if hasattr(processor, "to_json_string")
                else repr(processor),
                "pooling": pooling,
                "layers": sorted(indices) if indices is not None else as_given,
                "columns": [image_column, label_column],
                "samples": total,
                "dtype": dtype_name,
            }
            key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:32]
            entry = Path(cache_dir or default_cache_dir() / "features") / key
            if cache:
                cached = _read_cache_entry(entry, key, indices, total)
            elif not (entry.exists() or _record_path(entry).exists()):
                entry = None  # recomputed in memory: no entry to replace
        if processes.broadcast_from_main(cached is not None):
            if cached is not None:
                _note_source(cached)
            return cached  # None on the other processes

    home = parameter.device if parameter is not None else torch.device("cpu")
    if target is None:
        target = home if given_module else as_device("auto")
    input_dtype = torch.float32 if half else weights_dtype
    batches = math.ceil(total / batch_size)
    mine = list(range(processes.index, batches, processes.count))
    if num_workers is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", processes.count))
        num_workers = min(default_num_workers(local), max(0, len(mine) - 1))
        if target.type == "cpu":  # the model's threads use the cores: workers only on the cores left over
            num_workers = min(num_workers, max(0, available_cores() // local - torch.get_num_threads()))
    channels = getattr(base.config, "num_channels", 3)
    loader = torch.utils.data.DataLoader(
        _ImageBatches(dataset, mine, batch_size, total, image_column, label_column, processor, channels),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=target.type == "cuda",
    )
    folder = None
    if processes.is_main and entry is not None:
        folder = entry.parent / f".{entry.name}.{secrets.token_hex(4)}.partial"
        folder.mkdir(parents=True)
    writer = _FeatureWriter(total, folder, label_column) if processes.is_main else None
    was_training = base.training
    base.eval()
    base.to(target)
    bar = tqdm(total=total, desc="features", unit="image", disable=not (progress and processes.is_main))
    try:
        with _unmasked(base) as masks_patches, torch.inference_mode(), autocast(target, autocast_dtype):
            pending = iter(loader)
            for _ in range(math.ceil(batches / processes.count)):
                item = next(pending, None)  # None once this process's share is done
                part = None
                if item is not None:
                    number, pixel_values, labels = item
                    pixel_values = pixel_values.to(target, input_dtype, non_blocking=True)
                    outputs = base(
                        pixel_values=pixel_values, **_forward_kwargs(base, masks_patches, pixel_values)
                    )
                    states = outputs.hidden_states
                    if len(states) - 1 != num_layers:  # the config did not say, or the outputs disagree
                        num_layers = len(states) - 1
                        indices = resolve_layers(as_given, num_layers)
                        _check_pooler_layers(pooling, indices, num_layers)
                    pooled = {
                        index: (
                            outputs.pooler_output.flatten(1)
                            if pooling == "pooler"
                            else _pool(states[index], pooling)
                        )
                        .float()
                        .cpu()
                        .numpy()
                        for index in indices
                    }
                    part = (number, pooled, labels)
                for gathered in processes.gather_to_main(part) or ():
                    if gathered is not None:
                        bar.update(writer.append(gathered[1], gathered[2]))
        if not processes.is_main:
            return None
        meta = {
            "pooling": pooling,
            "image_column": image_column,
            "label_column": label_column,
            "samples": total,
            "dtype": dtype_name,
        }
        features, hashes = writer.finish(meta)
        labels = writer.labels
        if folder is not None:
            _commit_cache_entry(folder, entry, key, hashes)
            features = LayerFiles(entry, list(writer.outputs))
    except BaseException:
        if writer is not None:
            writer.abort()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        bar.close()
        base.train(was_training)
        if given_module and target != home:
            base.to(home)
    result = FeatureSet(features=features, labels=labels, meta=meta)
    _note_source(result)
    return result


def encoder_feature_fn(
    model_or_id, pooling: str = "mean", revision: str | None = None
) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """A feature function over [0, 1] pixel batches for Fréchet distances in any model's feature space.

    Returns ``(fn, image_size)``: ``fn`` takes float (N, 3, image_size, image_size) images in [0, 1],
    normalises them with the checkpoint's processor mean/std (0.5 when it has none), runs the encoder
    unmasked and pools the last hidden state like :func:`extract_features` (e.g. FD-DINOv2).
    """
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling must be 'mean' or 'cls' for a feature function; got {pooling!r}")
    model, processor = load_encoder(model_or_id, revision)
    base = (model.base_model if isinstance(model, PreTrainedModel) else model).eval()
    processor = processor or default_image_processor(base)
    size = getattr(base.config, "image_size", 224)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    mean = torch.tensor(getattr(processor, "image_mean", None) or [0.5] * 3).view(1, -1, 1, 1)
    std = torch.tensor(getattr(processor, "image_std", None) or [0.5] * 3).view(1, -1, 1, 1)
    channels = getattr(base.config, "num_channels", 3)

    def features(pixels: torch.Tensor) -> torch.Tensor:
        device = next(base.parameters()).device
        pixels = pixels[:, :channels] if channels < pixels.shape[1] else pixels
        pixels = ((pixels - mean[:, :channels]) / std[:, :channels]).to(device)
        with _unmasked(base) as masks_patches, torch.inference_mode():
            outputs = base(pixel_values=pixels, **_forward_kwargs(base, masks_patches, pixels))
            return _pool(outputs.hidden_states[-1], pooling).float().cpu()

    return features, size


_FEATURE_SOURCES: contextvars.ContextVar[list[dict] | None] = contextvars.ContextVar(
    "hf_resdecay_feature_sources", default=None
)


@contextlib.contextmanager
def recording_feature_sources() -> Iterator[list[dict]]:
    """Yield a list that gets one ``{"from_cache": bool, "samples": int}`` per :func:`extract_features` call
    made inside the block, in call order: how a command records, next to its results, which features were
    reused from the disk cache (functions such as ``evaluate_representations`` do not return them)."""
    sources: list[dict] = []
    token = _FEATURE_SOURCES.set(sources)
    try:
        yield sources
    finally:
        _FEATURE_SOURCES.reset(token)


def _note_source(result: FeatureSet) -> None:
    sources = _FEATURE_SOURCES.get()
    if sources is not None:
        sources.append({"from_cache": result.from_cache, "samples": int(result.meta.get("samples", 0))})


def _record_path(entry: Path) -> Path:
    """The JSON record next to a cache entry's folder: its key and the SHA-256 of each of its files."""
    return entry.with_name(entry.name + ".json")


def _drop_cache_entry(entry: Path) -> None:
    shutil.rmtree(entry, ignore_errors=True)
    with contextlib.suppress(OSError):
        _record_path(entry).unlink(missing_ok=True)


def _commit_cache_entry(folder: Path, entry: Path, key: str, hashes: dict[str, str]) -> None:
    """Move a finished ``folder`` into place as ``entry``, then write the record of its files' SHA-256: a
    reader never pairs new files with an old record, and an entry without its record is never trusted."""
    _drop_cache_entry(entry)
    os.replace(folder, entry)
    write_json_atomic({"key": key, "format": CACHE_FORMAT, "files": hashes}, _record_path(entry))


def _read_cache_entry(entry: Path, key: str, layers: list[int] | None, samples: int) -> FeatureSet | None:
    """The cached features when every file matches its recorded SHA-256 and the request; else None.

    A damaged, truncated, forged or unreadable entry is logged in one line and deleted, so the caller
    recomputes it and the next run is not stuck on it. Layers are memory-mapped, not read into memory.
    """
    record_path = _record_path(entry)
    if not entry.exists() and not record_path.exists():
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if (
            not isinstance(record, dict)
            or record.get("key") != key
            or not isinstance(record.get("files"), dict)
        ):
            raise ValueError(
                f"{record_path.name} does not record this entry's key and the SHA-256 of its files"
            )
        files = record["files"]
        present = sorted(path.name for path in entry.iterdir())
        if present != sorted(files):
            raise ValueError(f"it holds {present}, not the files whose SHA-256 was recorded")
        for name, digest in files.items():
            if sha256_of(entry / name) != digest:
                raise ValueError(f"the SHA-256 of {name} differs from the one recorded when it was written")
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        labels = np.load(entry / "labels.npy") if "labels.npy" in files else None
        stored = sorted(
            int(name[len("layer_") : -len(".npy")]) for name in files if name.startswith("layer_")
        )
        features = LayerFiles(entry, stored)
        rows = {features[layer].shape[0] for layer in stored}
        if rows != {samples} or (layers is not None and stored != sorted(layers)):
            raise ValueError(f"it holds layers {stored} x {sorted(rows)} rows, not what was asked")
    except Exception as error:  # whatever is wrong with a cache entry, recomputing it fixes it
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        logger.warning(f"feature cache {entry} is unusable ({reason}); recomputing the features")
        _drop_cache_entry(entry)
        return None
    return FeatureSet(features=features, labels=labels, meta={**meta, "cached": str(entry)}, from_cache=True)
