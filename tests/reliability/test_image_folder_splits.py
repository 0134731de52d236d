"""Image folders are split by folder names only: file names that contain split words stay where they are."""

import numpy as np
from PIL import Image

from hf_resdecay.data import load_image_dataset


def _image(path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), value, dtype=np.uint8)).save(path)


def test_file_names_with_split_words_stay_in_the_one_split_with_their_class_labels(tmp_path):
    names = {
        "cat": ["ILSVRC2012_val_00000001.png", "test_1.png", "n1.png"],
        "dog": ["train_x.png", "validation_2.png", "eval-3.png"],
    }
    for value, (label, files) in enumerate(names.items()):
        for name in files:
            _image(tmp_path / "images" / label / name, 100 * value)
    _image(tmp_path / "images" / ".thumbnails" / "test_9.png", 255)  # hidden: ignored, as before

    dataset = load_image_dataset(tmp_path / "images")
    assert list(dataset) == ["train"]
    train = dataset["train"]
    assert len(train) == 6 and train.features["label"].names == ["cat", "dog"]
    for row in train:  # each image keeps the label of its own class folder
        expected = 0 if np.asarray(row["image"]).max() == 0 else 1
        assert row["label"] == expected
    assert load_image_dataset(tmp_path / "images", split="train")["label"].count(0) == 3


def test_split_folders_still_make_splits_and_share_class_labels(tmp_path):
    _image(tmp_path / "data" / "train" / "cat" / "test_1.png", 0)
    _image(tmp_path / "data" / "train" / "dog" / "val_1.png", 100)
    _image(tmp_path / "data" / "val" / "cat" / "ILSVRC2012_val_00000002.png", 0)
    _image(tmp_path / "data" / "val" / "dog" / "train_2.png", 100)
    dataset = load_image_dataset(tmp_path / "data")
    assert sorted(dataset) == ["train", "validation"]
    for split in ("train", "validation"):
        assert dataset[split].features["label"].names == ["cat", "dog"]
        assert sorted(dataset[split]["label"]) == [0, 1]
