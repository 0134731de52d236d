"""Frozen features of any transformers vision model over an image dataset, per layer, cached on disk.

Works on ViT-family encoders (ViT, DeiT, DINOv2, ViTMAE and the decayed ViTMAE) and on CNNs with a
pooler (ResNet, ConvNeXt). ViTMAE checkpoints are read with masking off and patch order kept, so every
patch is seen. Layers index ``hidden_states``: 0 is the embedding output, ``i`` the output of block ``i``,
``-1`` the last block (:func:`resolve_layers`); no final LayerNorm is applied (the decay paper's linear-probe
protocol).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModel, PreTrainedModel, ViTImageProcessorPil

from ..assets import default_cache_dir, sha256_of
from ..atomic import atomic_write, write_json_atomic
from ..data import find_image_column, find_label_column

logger = logging.getLogger(__name__)

POOLINGS = ("mean", "cls", "pooler")


@dataclass
class FeatureSet:
    """Pooled features per layer (``features[layer]`` is a float32 (samples, dim) array) and labels.

    ``from_cache`` says whether they were read from a verified disk-cache entry rather than computed now.
    """

    features: dict[int, np.ndarray]
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


def load_model(
    model_or_id: torch.nn.Module | str | os.PathLike, trust_remote_code: bool = False, **kwargs
) -> torch.nn.Module:
    """``transformers.AutoModel.from_pretrained`` with this package's decayed models registered.

    A module is returned as given. Importing :mod:`hf_resdecay` registers ``vit_mae_decay`` with the Auto
    classes, so decayed checkpoints resolve without remote code; ``trust_remote_code`` stays off unless the
    caller turns it on. ``kwargs`` (``revision``, ``torch_dtype``, ...) go to ``from_pretrained``.
    """
    if isinstance(model_or_id, torch.nn.Module):
        return model_or_id
    import hf_resdecay  # noqa: F401  (registers the decayed models with the Auto classes)

    return AutoModel.from_pretrained(str(model_or_id), trust_remote_code=trust_remote_code, **kwargs)


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
    """SHA-256 over the config and every weight: two models share cached features only if identical."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
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
) -> FeatureSet:
    """Features of ``dataset`` (a ``datasets.Dataset`` with an image column) under ``model_or_id``.

    ``layers`` is a sequence of ``hidden_states`` indices or ``"all"`` (range-checked and de-duplicated by
    :func:`resolve_layers`, so ``(2, -1)`` on a 2-block model is layer 2 once); ``pooling`` is ``"mean"`` (all
    tokens, CLS included; spatial mean for CNNs), ``"cls"`` or ``"pooler"`` (the model's pooler output,
    last layer only). Images stream through in batches under ``torch.inference_mode``. With ``cache``,
    results are stored under ``cache_dir`` keyed by the model's weights and the dataset's fingerprint, with
    the SHA-256 of each entry beside it: an entry that fails the check or cannot be read is logged, deleted
    and recomputed. ``cache=False`` recomputes and replaces any entry under the same key.
    ``FeatureSet.from_cache`` tells which happened.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(map(repr, POOLINGS))}; got {pooling!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
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

    key_parts = {
        "model": _model_fingerprint(model),
        "dataset": getattr(dataset, "_fingerprint", None),
        "processor": processor.to_json_string() if hasattr(processor, "to_json_string") else repr(processor),
        "pooling": pooling,
        "layers": sorted(indices) if indices is not None else as_given,
        "columns": [image_column, label_column],
        "samples": total,
    }
    cache_file = None
    if key_parts["dataset"] is not None:
        key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:32]
        cache_file = Path(cache_dir or default_cache_dir() / "features") / f"{key}.npz"
        if not cache:  # recompute; a stale or damaged entry under this key is replaced, never left behind
            cache_file = cache_file if cache_file.exists() or _record_path(cache_file).exists() else None
        else:
            cached = _read_cache_entry(cache_file, key, indices, total)
            if cached is not None:
                _note_source(cached)
                return cached

    was_training = base.training
    base.eval()
    channels = getattr(base.config, "num_channels", 3)
    device = next(base.parameters()).device
    chunks: dict[int, list[np.ndarray]] = {}
    labels: list = []
    try:
        with _unmasked(base) as masks_patches, torch.inference_mode():
            for start in tqdm(
                range(0, total, batch_size), desc="features", disable=not progress, unit="batch"
            ):
                rows = dataset[start : min(start + batch_size, total)]
                images = [_to_rgb(image, channels) for image in rows[image_column]]
                pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
                outputs = base(
                    pixel_values=pixel_values, **_forward_kwargs(base, masks_patches, pixel_values)
                )
                states = outputs.hidden_states
                if len(states) - 1 != num_layers:  # the config did not say, or the outputs disagree
                    num_layers = len(states) - 1
                    indices = resolve_layers(as_given, num_layers)
                    _check_pooler_layers(pooling, indices, num_layers)
                for index in indices:
                    if pooling == "pooler":
                        pooled = outputs.pooler_output.flatten(1)
                    else:
                        pooled = _pool(states[index], pooling)
                    chunks.setdefault(index, []).append(pooled.float().cpu().numpy())
                if label_column is not None:
                    labels.extend(rows[label_column])
    finally:
        base.train(was_training)

    result = FeatureSet(
        features={index: np.concatenate(parts) for index, parts in chunks.items()},
        labels=np.asarray(labels, dtype=np.int64) if label_column is not None else None,
        meta={
            "pooling": pooling,
            "image_column": image_column,
            "label_column": label_column,
            "samples": total,
        },
    )
    if cache_file is not None:
        _save_cache_entry(cache_file, key, result)
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


def _record_path(cache_file: Path) -> Path:
    """The JSON record next to a cache entry: its key and the SHA-256 of the ``.npz``."""
    return cache_file.with_suffix(".json")


def _drop_cache_entry(cache_file: Path) -> None:
    for path in (cache_file, _record_path(cache_file)):
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def _read_cache_entry(
    cache_file: Path, key: str, layers: list[int] | None, samples: int
) -> FeatureSet | None:
    """The cached features when the entry matches its recorded SHA-256 and the request; else None.

    A damaged, truncated, forged or unreadable entry is logged in one line and deleted, so the caller
    recomputes it and the next run is not stuck on it.
    """
    record_path = _record_path(cache_file)
    if not cache_file.exists() and not record_path.exists():
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or record.get("key") != key or "sha256" not in record:
            raise ValueError(f"{record_path.name} does not record this entry's key and SHA-256")
        if sha256_of(cache_file) != record["sha256"]:
            raise ValueError("its SHA-256 differs from the one recorded when it was written")
        result = _load_feature_file(cache_file)
        rows = {len(values) for values in result.features.values()}
        if rows != {samples} or (layers is not None and sorted(result.features) != sorted(layers)):
            raise ValueError(f"it holds layers {result.layers} x {sorted(rows)} rows, not what was asked")
    except Exception as error:  # whatever is wrong with a cache entry, recomputing it fixes it
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        logger.warning(f"feature cache {cache_file} is unusable ({reason}); recomputing the features")
        _drop_cache_entry(cache_file)
        return None
    result.from_cache = True
    return result


def _save_cache_entry(cache_file: Path, key: str, result: FeatureSet) -> None:
    """Write the features, then the record of their SHA-256; each file appears whole or not at all."""
    _drop_cache_entry(cache_file)  # a reader never pairs a new file with an old record
    _save_feature_file(cache_file, result)
    write_json_atomic({"key": key, "sha256": sha256_of(cache_file)}, _record_path(cache_file))


def _save_feature_file(path: Path, result: FeatureSet) -> None:
    """Write the features next to their final name, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"layer_{index}": value for index, value in result.features.items()}
    if result.labels is not None:
        arrays["labels"] = result.labels
    arrays["meta"] = np.frombuffer(json.dumps(result.meta).encode(), dtype=np.uint8)
    with atomic_write(path, "wb") as handle:
        np.savez(handle, **arrays)


def _load_feature_file(path: Path) -> FeatureSet:
    with np.load(path, allow_pickle=False) as data:
        features = {int(name.split("_")[1]): data[name] for name in data.files if name.startswith("layer_")}
        labels = data["labels"] if "labels" in data.files else None
        meta = json.loads(data["meta"].tobytes().decode())
    return FeatureSet(features=features, labels=labels, meta={**meta, "cached": str(path)})
