"""A corrupt image: named in one line (exit 1) instead of a worker traceback, or skipped with
``--skip_bad_images`` (replaced by a fixed choice, listed in results.json); a broken dataset fails before
training."""

import io
import json

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image
from PIL import Image as PILImage

from hf_resdecay.training.images import BAD_IMAGES, ImageTransform, TrainImages, check_images, collate

from ..training_scripts.launch import launch, run_directly
from ..training_scripts.test_train_mae import TINY

BROKEN = b"\x89PNG\r\n\x1a\n not really"


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(np.full((20, 20, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _images(count: int, broken: set[int]) -> Dataset:
    cells = [
        {"bytes": BROKEN if i in broken else _png(i * 3), "path": f"img_{i:03d}.png"} for i in range(count)
    ]
    return Dataset.from_dict({"image": cells}, features=Features({"image": Image()}))


def test_bad_images_are_named_to_the_loader_and_replaced_by_a_fixed_choice():
    dataset = _images(8, {2, 3})
    plain = TrainImages(dataset, "image", ImageTransform(8, 3, "center", hflip=False))
    batch = collate(plain.__getitems__([1, 2, 5]))
    assert batch[BAD_IMAGES] == ["img_002.png", "img_003.png"]  # 2 is replaced by 4, 3 tried on the way
    with pytest.raises(OSError, match=r"img_002\.png"):
        plain[2]
    skipping = TrainImages(
        dataset, "image", ImageTransform(8, 3, "center", hflip=False), skip_bad_images=True
    )
    again = collate(skipping.__getitems__([1, 2, 5]))
    assert torch.equal(again["pixel_values"], batch["pixel_values"]) and again["pixel_values"].shape[0] == 3
    assert torch.equal(skipping[2]["pixel_values"], skipping[4]["pixel_values"])
    assert "bad_images" not in collate(skipping.__getitems__([0, 1]))
    loader = torch.utils.data.DataLoader(skipping, batch_size=4, num_workers=2, collate_fn=collate)
    assert [b.get(BAD_IMAGES) for b in loader] == [["img_002.png", "img_003.png", "img_003.png"], None]


def test_a_broken_dataset_fails_before_training(capsys):
    check_images(_images(40, {7}), "image", "RGB")  # not among the 16 images checked
    with pytest.raises(ValueError, match=r"1 of 16 images checked before training do not decode, e\.g\. "):
        check_images(_images(40, {0}), "image", "RGB")
    check_images(_images(40, {0}), "image", "RGB", skip_bad_images=True)
    assert "1 of 16 images checked do not decode: they will be skipped" in capsys.readouterr().out
    with pytest.raises(ValueError, match="16 of 16 images"):
        check_images(_images(40, set(range(40))), "image", "RGB", skip_bad_images=True)


@pytest.fixture
def folder(tmp_path):
    """64 good images and one corrupt file (index 3 in file order: not among the 16 checked up front) in one
    class folder."""
    images = tmp_path / "images" / "digits"
    images.mkdir(parents=True)
    for i in range(64):
        (images / f"img_{i:03d}.png").write_bytes(_png(i * 4))
    (images / "img_002b.png").write_bytes(BROKEN)
    return tmp_path / "images"


ARGS = [
    *TINY[:18],
    "--per_device_train_batch_size",
    "16",
    "--eval_every",
    "0",
    "--dataloader_num_workers",
    "1",
]


def test_a_corrupt_image_stops_the_run_with_one_line_naming_it(folder, tmp_path):
    out = tmp_path / "run"
    args = [*ARGS, "--train_dir", str(folder), "--output_dir", str(out)]
    result = run_directly("train_mae.py", args)  # the launcher would add its own traceback
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: cannot decode the image {folder / 'digits' / 'img_002b.png'}: fix or remove the file, or "
        "pass --skip_bad_images to train on without it"
    ]
    assert not (out / "config.json").exists()


def test_skip_bad_images_trains_on_and_lists_them(folder, tmp_path):
    out = tmp_path / "run"
    args = [*ARGS, "--train_dir", str(folder), "--output_dir", str(out), "--skip_bad_images"]
    result = launch("train_mae.py", [*args, "--max_train_steps", "4"])
    assert result.stdout.count("no labelled validation data: the kNN monitor is off") == 1
    results = json.loads((out / "results.json").read_text())
    assert results["skipped_images"] == {"count": 1, "files": [str(folder / "digits" / "img_002b.png")]}
    assert "knn" not in results


def test_a_dataset_whose_images_do_not_decode_fails_before_training(folder, tmp_path):
    (folder / "digits" / "img_000.png").write_bytes(BROKEN)
    result = run_directly(
        "train_mae.py", [*ARGS, "--train_dir", str(folder), "--output_dir", str(tmp_path / "o")]
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1].startswith(
        "error: 1 of 16 images checked before training do not decode"
    )
