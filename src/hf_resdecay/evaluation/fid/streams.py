"""Images to features, streamed: clean-fid resizing, batches from any source, FID of a diffusers pipeline.

:func:`clean_resize` resizes like clean-fid (PIL bicubic per channel, in float), and
:func:`inception_features` / :func:`fid_for_pipeline` stream images through the FID Inception or any other
feature function without holding all images in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...data import find_image_column
from .distance import feature_statistics, frechet_distance, frechet_distance_from_stats
from .inception import FID_IMAGE_SIZE, load_fid_inception

__all__ = ["clean_resize", "fid_for_pipeline", "inception_features"]


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
    with torch.inference_mode(), tqdm(total=total, unit="img", desc="features", disable=not progress) as bar:
        for batch in batches:
            pixels = clean_resize(batch, size)
            features = feature_fn(pixels if device is None else pixels.to(device))
            chunks.append(features.reshape(len(pixels), -1).double().cpu().numpy())
            bar.update(len(pixels))
    if not chunks:
        raise ValueError("no images to compute features of")
    return np.concatenate(chunks)


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
) -> float:
    """FID of ``num_samples`` images from an unconditional diffusers pipeline against ``reference``.

    Calls ``pipeline(batch_size=..., generator=generator, output_type=output_type, **pipeline_kwargs)``
    until ``num_samples`` images exist (diffusers returns "np" as (N, H, W, C) and "pt" as (N, C, H, W) in
    [0, 1]), streaming them through the feature extractor. ``reference``: precomputed ``(mu, sigma)``, or
    images in any form :func:`inception_features` takes (a ``datasets.Dataset``, an array, an iterable).
    Features come from ``model`` (default: the FID Inception) or ``feature_fn``, as in ``inception_features``.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 to estimate a covariance; got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    fn, device = _feature_fn(model, feature_fn, device)

    def generated() -> Iterator[Any]:
        remaining = num_samples
        while remaining > 0:
            output = pipeline(
                batch_size=min(batch_size, remaining),
                generator=generator,
                output_type=output_type,
                **(pipeline_kwargs or {}),
            )
            images = output.images if hasattr(output, "images") else output[0]
            if isinstance(images, np.ndarray) and images.ndim == 4:
                images = torch.from_numpy(images).permute(0, 3, 1, 2)  # diffusers "np" is channels-last
            images = images[:remaining]
            if len(images) == 0:
                raise RuntimeError("the pipeline returned no images")
            remaining -= len(images)
            yield images

    generated_features = _extract(generated(), fn, size, device, num_samples, progress)
    if _is_stats(reference):
        mu, sigma = feature_statistics(generated_features, "generated features")
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
    return frechet_distance(generated_features, reference_features)
