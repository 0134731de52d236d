"""Images to features, streamed: clean-fid resizing, batches from any source, FID of a diffusers pipeline.

:func:`clean_resize` resizes like clean-fid (PIL bicubic per channel, in float), and
:func:`inception_features` / :func:`fid_for_pipeline` stream images through the FID Inception or any other
feature function without holding all images in memory.

:func:`generated_features` makes a pipeline's samples batch by batch on the device. With a ``seed``, batch
``b`` draws from its own generator (:func:`batch_generator`) and a class-conditional pipeline (DiT) gets the
labels :func:`spread_class_labels` assigns to its sample indices, so each batch is a function of ``(seed,
b)`` alone: with ``resume_dir`` the features of finished batches are saved (each file atomically, then its
SHA-256 in the run's manifest), and a rerun after an interruption computes only the missing batches,
ending with exactly the features of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...assets import sha256_of
from ...atomic import atomic_write, write_json_atomic
from ...data import find_image_column
from .distance import feature_statistics, frechet_distance, frechet_distance_from_stats
from .inception import FID_IMAGE_SIZE, load_fid_inception

__all__ = [
    "batch_generator",
    "clean_resize",
    "fid_for_pipeline",
    "generated_features",
    "inception_features",
    "spread_class_labels",
]

logger = logging.getLogger(__name__)


def _as_chw255(image: Any) -> np.ndarray:
    """One image as float32 (3, H, W) in [0, 255]; see :func:`clean_resize` for the accepted forms."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
    if torch.is_tensor(image):
        image = image.detach().cpu()
        image = image if image.dtype == torch.uint8 else image.float()
    array = np.asarray(image)
    if array.dtype == np.uint8:
        layout = "uint8 images are (H, W, C) or (H, W)"
        array = array.astype(np.float32)
        array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    elif np.issubdtype(array.dtype, np.floating):
        layout = "float images are (C, H, W) or (H, W)"
        if array.size and (array.min() < -1e-3 or array.max() > 1 + 1e-3):
            raise ValueError(
                f"float images must be in [0, 1]; got values in [{array.min():.3g}, {array.max():.3g}] "
                "(map [-1, 1] images with (x + 1) / 2, or pass uint8)"
            )
        array = np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0
        array = array[None] if array.ndim == 2 else array
    else:
        raise ValueError(f"images must be uint8 (0-255) or float in [0, 1]; got dtype {array.dtype}")
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise ValueError(f"an image must have 1 or 3 channels ({layout}); got shape {tuple(np.shape(image))}")
    return np.repeat(array, 3, axis=0) if array.shape[0] == 1 else array


def clean_resize(images: Any, size: int | None = FID_IMAGE_SIZE) -> Tensor:
    """Images as a float32 (N, 3, size, size) tensor in [0, 1], resized the way clean-fid does.

    Each channel is resized in float32 (PIL mode ``"F"``, values 0-255) with PIL bicubic and clipped to
    [0, 255], which avoids the aliasing and uint8 quantisation of other resizers (Parmar et al., 2022).
    ``images``: a sequence of single images, or an array/tensor holding a batch. A single image is a PIL
    image (converted to RGB), a uint8 array (H, W, C) or (H, W) in 0-255, or a float array/tensor (C, H, W)
    or (H, W) in [0, 1]. A batch is 4-D, (N, H, W, C) for uint8 and (N, C, H, W) for float, or 3-D (N, H, W)
    grayscale. Grayscale (one channel) is replicated to 3. ``size=None`` keeps the size (all must agree).
    """
    if isinstance(images, Image.Image):
        images = [images]
    batch = []
    for image in images:
        array = _as_chw255(image)
        if size is not None:
            channels = [
                np.asarray(
                    Image.fromarray(np.ascontiguousarray(channel)).resize(
                        (size, size), Image.Resampling.BICUBIC
                    )
                )
                for channel in array
            ]
            array = np.clip(np.stack(channels), 0.0, 255.0)
        batch.append(array)
    if not batch:
        raise ValueError("images is empty")
    if len({a.shape for a in batch}) > 1:
        raise ValueError(
            f"images have different sizes {sorted({a.shape for a in batch})}; pass size= to resize"
        )
    return torch.from_numpy(np.stack(batch).astype(np.float32) / 255.0)


def _iter_batches(images: Any, batch_size: int, image_column: str | None) -> Iterator[Any]:
    """Batches (arrays, or lists of single images) from any accepted source, without loading it all."""
    if hasattr(images, "column_names") and hasattr(images, "iter"):  # datasets.Dataset / IterableDataset
        column = find_image_column(images, image_column)
        for rows in images.select_columns([column]).iter(batch_size=batch_size):
            yield rows[column]
    elif isinstance(images, (np.ndarray, Tensor)):
        if images.ndim not in (3, 4):
            raise ValueError(
                f"an image array must be a batch (N, ...), 3-D or 4-D; got shape {tuple(images.shape)}"
            )
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size]
    else:
        iterator = iter([images] if isinstance(images, Image.Image) else images)
        while chunk := list(islice(iterator, batch_size)):
            yield [item[image_column or "image"] if isinstance(item, dict) else item for item in chunk]


def _extract(
    batches: Iterable[Any],
    feature_fn: Callable[[Tensor], Tensor],
    size: int | None,
    device: torch.device | str | None,
    total: int | None,
    progress: bool,
) -> np.ndarray:
    chunks = []
    with tqdm(total=total, unit="img", desc="features", disable=not progress) as bar:
        for batch in batches:
            chunks.append(_batch_features(batch, feature_fn, size, device).astype(np.float64))
            bar.update(len(chunks[-1]))
    if not chunks:
        raise ValueError("no images to compute features of")
    return np.concatenate(chunks)


def _batch_features(
    batch: Any, feature_fn: Callable[[Tensor], Tensor], size: int | None, device: Any
) -> np.ndarray:
    """(B, D) features of one batch of images, in the dtype ``feature_fn`` returns, on the CPU."""
    with torch.inference_mode():
        pixels = clean_resize(batch, size)
        features = feature_fn(pixels if device is None else pixels.to(device)).reshape(len(pixels), -1)
        if features.dtype not in (torch.float32, torch.float64):
            features = features.float()  # half precision: exact in float32, which numpy holds
        return features.cpu().numpy()


def _feature_fn(
    model: nn.Module | None, feature_fn: Callable[[Tensor], Tensor] | None, device: Any
) -> tuple[Callable[[Tensor], Tensor], Any]:
    if model is not None and feature_fn is not None:
        raise ValueError("pass either model or feature_fn, not both")
    if feature_fn is not None:
        return feature_fn, device
    model = (model if model is not None else load_fid_inception()).eval()
    return model, device if device is not None else next(model.parameters()).device


def inception_features(
    images: Any,
    model: nn.Module | None = None,
    *,
    feature_fn: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 50,
    size: int | None = FID_IMAGE_SIZE,
    image_column: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> np.ndarray:
    """(N, D) float64 features of ``images``, streamed in batches under ``torch.inference_mode``.

    ``images``: a ``datasets.Dataset``/``IterableDataset`` (its image column, found by feature type or
    ``image_column``), a batched array/tensor, or any iterable of single images (or of dict rows); the forms
    are those of :func:`clean_resize`, which resizes every batch to ``size`` and gives [0, 1] floats to
    ``model`` (default: :func:`load_fid_inception`, the FID features) or to any ``feature_fn`` (e.g. DINOv2
    features for an FD-DINOv2; it gets float (B, 3, size, size) in [0, 1] on the CPU, or on ``device``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    fn, device = _feature_fn(model, feature_fn, device)
    total = len(images) if hasattr(images, "__len__") and not isinstance(images, Image.Image) else None
    return _extract(_iter_batches(images, batch_size, image_column), fn, size, device, total, progress)


def _is_stats(reference: Any) -> bool:
    return (
        isinstance(reference, (tuple, list))
        and len(reference) == 2
        and all(isinstance(x, (np.ndarray, Tensor)) for x in reference)
        and reference[0].ndim == 1
        and reference[1].ndim == 2
    )


def spread_class_labels(start: int, count: int, num_classes: int) -> Tensor:
    """Class labels of samples ``start .. start + count - 1`` of a run: sample ``i`` gets ``i % num_classes``,
    so every class gets ``N / num_classes`` samples (up to one) and a batch's labels depend only on its
    position in the run."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1; got {num_classes}")
    return (torch.arange(start, start + count) % num_classes).long()


def batch_generator(seed: int, batch: int) -> torch.Generator:
    """The CPU generator of batch ``batch`` of a run seeded ``seed`` (both mixed by numpy's SeedSequence,
    so nearby seeds and batches do not share streams); a CPU generator draws the same noise on any device."""
    state = np.random.SeedSequence([int(seed), int(batch)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _class_count(pipeline: Any) -> int | None:
    """How many classes a class-conditional pipeline (one whose ``__call__`` takes ``class_labels``, e.g.
    a DiT) samples from; None for an unconditional one."""
    try:
        parameters = inspect.signature(pipeline).parameters
    except (TypeError, ValueError):
        return None
    if "class_labels" not in parameters:
        return None
    model = getattr(pipeline, "transformer", None) or getattr(pipeline, "unet", None)
    count = getattr(getattr(model, "config", None), "num_embeds_ada_norm", None)
    if not isinstance(count, int) or count < 1:
        raise ValueError(
            "the pipeline takes class_labels but its model's config has no num_embeds_ada_norm (class count)"
        )
    return count


def _images_of(output: Any) -> Any:
    images = output.images if hasattr(output, "images") else output[0]
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = torch.from_numpy(images).permute(0, 3, 1, 2)  # diffusers "np" is channels-last
    return images


def _fingerprint(value: Any) -> str:
    """SHA-256 of a pipeline (the config and weights of every component) or of a feature model."""
    from ..features import _model_fingerprint

    digest = hashlib.sha256()
    components = getattr(value, "components", None)
    parts = sorted(components.items()) if isinstance(components, dict) else [("model", value)]
    for name, component in parts:
        digest.update(name.encode())
        if isinstance(component, nn.Module):
            digest.update(_model_fingerprint(component).encode())
        elif hasattr(component, "config"):
            digest.update(json.dumps(dict(component.config), sort_keys=True, default=str).encode())
        else:
            digest.update(type(component).__name__.encode())
    return digest.hexdigest()


class _BatchStore:
    """Features of finished batches under ``folder``: ``batch_NNNNNN.npy`` files, each written atomically,
    and ``manifest.json`` recording the run's key and each file's SHA-256 (rewritten atomically after it)."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = folder, key
        self.manifest_path = folder / "manifest.json"
        self.hashes: dict[str, str] = {}
        if self.manifest_path.exists():
            try:
                manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
                if manifest.get("key") == key and isinstance(manifest.get("batches"), dict):
                    self.hashes = dict(manifest["batches"])
            except (OSError, ValueError) as error:
                logger.warning(f"{self.manifest_path} is unreadable ({error}); generating every batch again")

    def _path(self, batch: int) -> Path:
        return self.folder / f"batch_{batch:06d}.npy"

    def load(self, batch: int) -> np.ndarray | None:
        """The saved features of ``batch`` when its file matches the recorded SHA-256; else None."""
        expected = self.hashes.get(str(batch))
        path = self._path(batch)
        if expected is None:
            return None
        try:
            if sha256_of(path) != expected:
                raise ValueError("its SHA-256 differs from the one recorded when it was written")
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            logger.warning(f"saved features {path} are unusable ({error}); generating the batch again")
            self.hashes.pop(str(batch))
            return None

    def save(self, batch: int, features: np.ndarray) -> None:
        path = self._path(batch)
        with atomic_write(path, "wb") as handle:
            np.save(handle, features, allow_pickle=False)
        self.hashes[str(batch)] = sha256_of(path)
        write_json_atomic({"key": self.key, "batches": self.hashes}, self.manifest_path)


def generated_features(
    pipeline: Callable[..., Any],
    num_samples: int,
    batch_size: int,
    seed: int,
    feature_fn: Callable[[Tensor], Tensor],
    *,
    size: int | None = FID_IMAGE_SIZE,
    device: str | torch.device | None = None,
    guidance_scale: float | None = None,
    output_type: Literal["np", "pt", "pil"] = "np",
    pipeline_kwargs: dict[str, Any] | None = None,
    resume_dir: str | os.PathLike | None = None,
    resume_key: dict[str, Any] | None = None,
    progress: bool = True,
) -> np.ndarray:
    """(num_samples, D) float64 features of a pipeline's samples, generated ``batch_size`` at a time.

    Batch ``b`` is ``pipeline(batch_size=n, generator=batch_generator(seed, b), ...)``, or for a
    class-conditional pipeline ``pipeline(class_labels=spread_class_labels(b * batch_size, n, C), ...)``
    with ``guidance_scale`` when given (None: the pipeline's default). The pipeline generates on its own
    device (move it first); pixels go to ``feature_fn`` on ``device``. With ``resume_dir``, the run's
    features live in ``resume_dir/<key>/`` (the key: the pipeline's weights, these settings and
    ``resume_key``, which must identify ``feature_fn``); finished batches found there are reused.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1; got {num_samples} and {batch_size}")
    num_classes = _class_count(pipeline)
    if guidance_scale is not None and num_classes is None:
        raise ValueError(
            f"guidance_scale {guidance_scale} needs a class-conditional pipeline (a DiT); this one takes no "
            "class_labels"
        )
    kwargs = dict(pipeline_kwargs or {})
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    store = None
    if resume_dir is not None:
        if resume_key is None:
            raise ValueError(
                "resume_dir needs resume_key naming the feature extractor (saved features are its)"
            )
        parts = {
            "pipeline": _fingerprint(pipeline),
            "samples": num_samples,
            "batch_size": batch_size,
            "seed": seed,
            "kwargs": kwargs,
            "output_type": output_type,
            "size": size,
            "features": resume_key,
            "format": "fid-batches-v1",
        }
        key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]
        store = _BatchStore(Path(resume_dir) / key, key)
    chunks = []
    with tqdm(total=num_samples, unit="img", desc="generating", disable=not progress) as bar:
        for batch, start in enumerate(range(0, num_samples, batch_size)):
            count = min(batch_size, num_samples - start)
            features = store.load(batch) if store is not None else None
            if features is None:
                call = {"generator": batch_generator(seed, batch), "output_type": output_type, **kwargs}
                if num_classes is None:
                    call["batch_size"] = count
                else:
                    call["class_labels"] = spread_class_labels(start, count, num_classes).tolist()
                images = _images_of(pipeline(**call))[:count]
                if len(images) != count:
                    raise RuntimeError(f"the pipeline returned {len(images)} images for a batch of {count}")
                features = _batch_features(images, feature_fn, size, device)
                if store is not None:
                    store.save(batch, features)
            chunks.append(features.astype(np.float64))
            bar.update(count)
    return np.concatenate(chunks)


def fid_for_pipeline(
    pipeline: Callable[..., Any],
    reference: Any,
    num_samples: int,
    batch_size: int = 50,
    generator: torch.Generator | None = None,
    *,
    model: nn.Module | None = None,
    feature_fn: Callable[[Tensor], Tensor] | None = None,
    size: int | None = FID_IMAGE_SIZE,
    image_column: str | None = None,
    output_type: Literal["np", "pt", "pil"] = "np",
    pipeline_kwargs: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    seed: int | None = None,
    guidance_scale: float | None = None,
    resume_dir: str | os.PathLike | None = None,
    feature_key: str | None = None,
) -> float:
    """FID of ``num_samples`` images from a diffusers pipeline against ``reference``.

    ``reference``: precomputed ``(mu, sigma)``, or images in any form :func:`inception_features` takes (a
    ``datasets.Dataset``, an array, an iterable). Features come from ``model`` (default: the FID Inception)
    or ``feature_fn``, as in ``inception_features``. ``device``: where the pipeline generates and the
    features are computed (the pipeline and ``model`` are moved there).

    With ``seed``, generation is :func:`generated_features`: per-batch generators, class labels spread evenly
    over a class-conditional pipeline's classes, ``guidance_scale``, and with ``resume_dir`` resumable from
    the saved features of finished batches (``feature_key`` names a ``feature_fn``; a ``model`` is
    identified by its weights). Without ``seed``, an unconditional pipeline is called
    ``pipeline(batch_size=..., generator=generator, output_type=output_type, **pipeline_kwargs)`` with the
    one ``generator`` shared by all batches (diffusers returns "np" as (N, H, W, C) and "pt" as (N, C, H, W)
    in [0, 1]).
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 to estimate a covariance; got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if seed is None and (resume_dir is not None or guidance_scale is not None):
        raise ValueError("resume_dir and guidance_scale need seed= (per-batch generators)")
    if seed is not None and generator is not None:
        raise ValueError(
            "pass either generator (one shared by all batches) or seed (one per batch), not both"
        )
    if device is not None:
        if hasattr(pipeline, "to"):
            pipeline.to(device)
        if model is not None:
            model.to(device)
    fn, device = _feature_fn(model, feature_fn, device)

    if seed is not None:
        if resume_dir is not None and feature_fn is not None and feature_key is None:
            raise ValueError(
                "resume_dir with feature_fn needs feature_key naming it (saved features are its)"
            )
        key = None
        if resume_dir is not None:
            key = {"feature_fn": feature_key} if feature_fn is not None else {"model": _fingerprint(fn)}
        features = generated_features(
            pipeline,
            num_samples,
            batch_size,
            seed,
            fn,
            size=size,
            device=device,
            guidance_scale=guidance_scale,
            output_type=output_type,
            pipeline_kwargs=pipeline_kwargs,
            resume_dir=resume_dir,
            resume_key=key,
            progress=progress,
        )
    else:

        def generated() -> Iterator[Any]:
            remaining = num_samples
            while remaining > 0:
                output = pipeline(
                    batch_size=min(batch_size, remaining),
                    generator=generator,
                    output_type=output_type,
                    **(pipeline_kwargs or {}),
                )
                images = _images_of(output)[:remaining]
                if len(images) == 0:
                    raise RuntimeError("the pipeline returned no images")
                remaining -= len(images)
                yield images

        features = _extract(generated(), fn, size, device, num_samples, progress)
    if _is_stats(reference):
        mu, sigma = feature_statistics(features, "generated features")
        return frechet_distance_from_stats(mu, sigma, *reference)
    reference_features = inception_features(
        reference,
        feature_fn=fn,
        batch_size=batch_size,
        size=size,
        image_column=image_column,
        device=device,
        progress=progress,
    )
    return frechet_distance(features, reference_features)
