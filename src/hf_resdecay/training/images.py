"""Training images as MAE's and ADM's pipelines make them: decoded, cropped from the original image and
flipped inside DataLoader workers, sent as uint8 (a quarter of float32's traffic), normalised on the device.

Every random choice for an image (crop box, flip) comes from ``numpy.random.default_rng([seed, epoch,
index])``: it depends on which image and which epoch, never on the worker that decoded it, the batch it fell
in or what ran before, so a resumed run draws exactly what an uninterrupted one would have drawn.

Crops:

- ``"random-resized"`` (MAE pretraining): a box covering a uniform fraction ``scale`` of the original image's
  area with a log-uniform aspect ratio in ``ratio`` (ten tries, then the largest central box of an allowed
  ratio), resized to the model's size with bicubic filtering in one step, so a small box keeps the detail of
  the full-resolution image;
- ``"center"`` (diffusion, as in ADM/DiT): the shorter side resized to the model's size, the centre cut out.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..evaluation._runtime import default_num_workers

CROPS = ("random-resized", "center")


def normalization_stats(channels: int, processor=None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per channel: the image processor's when it has them (a checkpoint's own
    normalisation), else ImageNet's (MAE's), averaged over RGB for one-channel images."""
    mean = getattr(processor, "image_mean", None)
    std = getattr(processor, "image_std", None)
    if mean is None or std is None:
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    mean, std = tuple(float(value) for value in mean), tuple(float(value) for value in std)
    if channels == 1 and len(mean) == 3:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"image_mean/image_std have {len(mean)}/{len(std)} values for {channels} channels")
    return mean, std


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of a random box in a ``width`` x ``height`` image: area a uniform
    fraction ``scale`` of the image's, aspect ratio (width/height) log-uniform in ``ratio``."""
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        box_width = round(math.sqrt(target * aspect))
        box_height = round(math.sqrt(target / aspect))
        if 0 < box_width <= width and 0 < box_height <= height:
            left = int(rng.integers(0, width - box_width + 1))
            top = int(rng.integers(0, height - box_height + 1))
            return left, top, left + box_width, top + box_height
    aspect = width / height  # no try fitted: the largest central box whose ratio is allowed
    if aspect < ratio[0]:
        box_width, box_height = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        box_width, box_height = round(height * ratio[1]), height
    else:
        box_width, box_height = width, height
    left, top = (width - box_width) // 2, (height - box_height) // 2
    return left, top, left + box_width, top + box_height


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest central square of a ``width`` x ``height`` image."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def decode_image(value, mode: str):
    """A PIL image in ``mode`` from a ``datasets`` image cell: a PIL image, or ``{"bytes", "path"}`` when the
    column is not decoded. A file that does not decode raises ``OSError`` naming it."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert(mode)
    path = value.get("path") if isinstance(value, dict) else None
    data = value.get("bytes") if isinstance(value, dict) else None
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            return image.convert(mode)
    except (OSError, ValueError, SyntaxError) as error:
        raise BadImageError(path, error) from error


class BadImageError(OSError):
    """An image that does not decode; ``path`` names its file (None for bytes without a path)."""

    def __init__(self, path: str | None, cause: BaseException):
        super().__init__(f"cannot decode the image {path or '(embedded bytes)'}: {cause}")
        self.path = path


def _bad_name(error: OSError, index: int) -> str:
    path = getattr(error, "path", None)
    return str(path) if path else f"image at index {index} ({' '.join(str(error).split())})"


class ImageTransform:
    """One training image from a decoded PIL image: crop box, resize (bicubic) to ``image_size``, optional
    horizontal flip, as a uint8 ``(channels, image_size, image_size)`` tensor."""

    def __init__(
        self,
        image_size: int,
        channels: int,
        crop: str = "random-resized",
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: bool = True,
    ):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)}; got {crop!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3; got {channels}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1; got {tuple(scale)}")
        self.image_size, self.channels, self.crop = image_size, channels, crop
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.mode = "RGB" if channels == 3 else "L"

    def __call__(self, image, rng: np.random.Generator) -> torch.Tensor:
        from PIL import Image

        image = decode_image(image, self.mode)
        width, height = image.size
        if self.crop == "random-resized":
            box = random_resized_crop_box(width, height, rng, self.scale, self.ratio)
        else:
            box = center_crop_box(width, height)
        size = (self.image_size, self.image_size)
        image = image.resize(size, resample=Image.Resampling.BICUBIC, box=box)
        if self.hflip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.uint8).reshape(self.image_size, self.image_size, -1)
        return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _undecoded(dataset, image_column: str):
    """``dataset`` with its image column left as bytes/paths, so that workers decode and errors name files."""
    from datasets import Image

    feature = dataset.features.get(image_column) if dataset.features is not None else None
    if isinstance(feature, Image) and feature.decode:
        return dataset.cast_column(image_column, Image(decode=False))
    return dataset


def _training_sample(
    row: dict, image_column: str, label_column: str | None, transform: ImageTransform, rng
) -> dict:
    sample = {"pixel_values": transform(row[image_column], rng)}
    if label_column is not None:
        sample["labels"] = int(row[label_column])
    return sample


BAD_IMAGES = "bad_images"
"""Batch key listing the files of the images that did not decode (each replaced; see :class:`TrainImages`)."""
REPLACEMENT_TRIES = 64


class TrainImages(torch.utils.data.Dataset):
    """A ``datasets.Dataset`` as training samples ``{"pixel_values": uint8 (C, S, S)[, "labels"]}``, each a
    function of ``(seed, epoch, index)`` alone; call :meth:`set_epoch` before each epoch's iteration.

    An image that does not decode raises ``OSError`` naming it when read by index; in a loader's batch
    (:meth:`__getitems__`) it is replaced and named under :data:`BAD_IMAGES`, so the training loop can stop
    with one line or, with ``skip_bad_images``, train on: the replacement is the next index that decodes, a
    fixed choice, so a resumed run reads what an uninterrupted one read.
    """

    def __init__(
        self,
        dataset,
        image_column: str,
        transform: ImageTransform,
        label_column: str | None = None,
        seed=0,
        skip_bad_images: bool = False,
    ):
        self.dataset = _undecoded(dataset, image_column)
        self.image_column, self.label_column = image_column, label_column
        self.transform, self.seed, self.epoch = transform, seed, 0
        self.skip_bad_images = skip_bad_images

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def _sample(self, row: dict, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return _training_sample(row, self.image_column, self.label_column, self.transform, rng)

    def _replaced(self, index: int, error: OSError) -> dict:
        """The sample of the next index that decodes, naming ``index``'s image (and any other bad one)."""
        bad = [_bad_name(error, index)]
        for offset in range(1, REPLACEMENT_TRIES + 1):
            other = (index + offset) % len(self.dataset)
            try:
                sample = self._sample(self.dataset[other], index)
            except OSError as again:
                bad.append(_bad_name(again, other))
                continue
            return {**sample, BAD_IMAGES: bad}
        raise OSError(f"none of the {REPLACEMENT_TRIES} images after index {index} decodes: {bad[0]}")

    def __getitem__(self, index: int) -> dict:
        try:
            return self._sample(self.dataset[int(index)], int(index))
        except OSError as error:
            if not self.skip_bad_images:
                raise
            return self._replaced(int(index), error)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        rows = self.dataset[list(map(int, indices))]  # one columnar read for the whole batch
        samples = []
        for i, index in enumerate(indices):
            try:
                samples.append(self._sample({key: values[i] for key, values in rows.items()}, int(index)))
            except OSError as error:  # named to the main process, which stops or skips
                samples.append(self._replaced(int(index), error))
        return samples


def collate(samples: list[dict]) -> dict:
    """A batch of samples; the names of the images that did not decode (if any) under :data:`BAD_IMAGES`."""
    bad = [name for sample in samples for name in sample.get(BAD_IMAGES, [])]
    batch = torch.utils.data.default_collate(
        [{k: v for k, v in s.items() if k != BAD_IMAGES} for s in samples]
    )
    if bad:
        batch[BAD_IMAGES] = bad
    return batch


def check_images(
    dataset, image_column: str, mode: str, count: int = 16, skip_bad_images: bool = False
) -> None:
    """Decode ``count`` images spread over ``dataset`` before training, so that a broken dataset fails at
    once: raise ``ValueError`` naming the first that does not decode (with ``skip_bad_images``, only when
    none of them decodes)."""
    if len(dataset) == 0:
        return
    dataset = _undecoded(dataset, image_column)
    indices = sorted({round(i * (len(dataset) - 1) / max(1, count - 1)) for i in range(count)})
    bad = []
    for index in indices:
        try:
            decode_image(dataset[index][image_column], mode)
        except OSError as error:
            bad.append(" ".join(str(error).split()))
    if bad and (not skip_bad_images or len(bad) == len(indices)):
        raise ValueError(
            f"{len(bad)} of {len(indices)} images checked before training do not decode, e.g. {bad[0]}: "
            "fix or remove them, or pass --skip_bad_images"
        )
    if bad:
        print(f"{len(bad)} of {len(indices)} images checked do not decode: they will be skipped", flush=True)


class StreamingTrainImages(torch.utils.data.IterableDataset):
    """A streamed ``datasets.IterableDataset`` (already split for this process) as training samples.

    The random choices of the ``n``-th image a DataLoader worker yields in an epoch come from ``(seed, epoch,
    rank, worker, n)``: with the same number of workers the stream is the same on every run, so skipping
    the batches already trained on resumes exactly. An image that does not decode is left out and named
    under :data:`BAD_IMAGES` in the next sample (without ``skip_bad_images`` the stream ends there, for the
    loop to stop).
    """

    def __init__(
        self,
        dataset,
        image_column: str,
        transform: ImageTransform,
        label_column: str | None = None,
        seed: int = 0,
        rank: int = 0,
        skip_bad_images: bool = False,
    ):
        self.dataset = _undecoded(dataset, image_column)
        self.image_column, self.label_column = image_column, label_column
        self.transform, self.seed, self.rank, self.epoch = transform, seed, rank, 0
        self.skip_bad_images, self.pending = skip_bad_images, []
        size = transform.image_size
        self._blank = torch.zeros(transform.channels, size, size, dtype=torch.uint8)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.set_epoch(epoch)  # the shuffle buffer's order follows seed + epoch

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        count = 0
        for row in self.dataset:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, count])
            try:
                sample = _training_sample(row, self.image_column, self.label_column, self.transform, rng)
            except OSError as error:  # named to the main process in the next sample, which stops or skips
                self.pending.append(_bad_name(error, count))
                if not self.skip_bad_images:
                    sample = {"pixel_values": self._blank.clone()}
                    if self.label_column is not None:
                        sample["labels"] = 0
                    yield {**sample, BAD_IMAGES: self.pending}
                    return
                continue
            if self.pending:
                sample[BAD_IMAGES], self.pending = self.pending, []
            count += 1
            yield sample


class Normalize(nn.Module):
    """uint8 images on the device to float ``(x / 255 - mean) / std`` in the given dtype."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scaled = images.float().div_(255)
        return ((scaled - self.mean.to(scaled.device)) / self.std.to(scaled.device)).to(dtype)


def training_loader(accelerator, train, image_column: str, transform: ImageTransform, args, data_args,
                    label_column: str | None = None):  # fmt: skip
    """``(loader, data)`` for the training loop: a map-style ``train`` becomes :class:`TrainImages` in a
    shuffled loader prepared by Accelerate (the seedable sampler orders it); a streamed one is split between
    processes and shuffled in a buffer (:class:`StreamingTrainImages`), its batches moved by the loop.

    Images are decoded in ``args.dataloader_num_workers`` workers (default: :func:`default_num_workers`),
    batches are uint8, pinned when the device is a GPU. A map-style dataset is checked first
    (:func:`check_images`: ``ValueError`` when its images do not decode).
    """
    from datasets import IterableDataset

    skip = data_args.skip_bad_images
    workers = args.dataloader_num_workers
    if workers is None:
        workers = default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    options = dict(
        batch_size=args.per_device_train_batch_size,
        collate_fn=collate,
        drop_last=True,
        num_workers=workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    if isinstance(train, IterableDataset):
        from datasets.distributed import split_dataset_by_node

        stream = split_dataset_by_node(train, accelerator.process_index, accelerator.num_processes)
        stream = stream.shuffle(seed=args.seed, buffer_size=data_args.shuffle_buffer_size)
        data = StreamingTrainImages(
            stream, image_column, transform, label_column, args.seed, accelerator.process_index, skip
        )
        return torch.utils.data.DataLoader(data, **options), data
    check_images(train, image_column, transform.mode, skip_bad_images=skip)
    data = TrainImages(train, image_column, transform, label_column, args.seed, skip)
    loader = torch.utils.data.DataLoader(data, shuffle=True, **options)
    return accelerator.prepare(loader), data
