"""The training image pipeline (hf_resdecay.training.images): crops from the original image, decoded in
workers, uint8, a function of (seed, epoch, index) alone."""

import io

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage

from hf_resdecay.training.images import (
    ImageTransform,
    Normalize,
    TrainImages,
    normalization_stats,
    random_resized_crop_box,
)


def _quadrants(width: int = 320, height: int = 200) -> PILImage.Image:
    """An RGB image whose four quadrants have four different colours, with black and white stripes of period
    8 px over the top-left one: detail that only a crop of the full-resolution image keeps."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[: height // 2, : width // 2] = (255, 0, 0)
    array[: height // 2, width // 2 :] = (0, 255, 0)
    array[height // 2 :, : width // 2] = (0, 0, 255)
    array[height // 2 :, width // 2 :] = (255, 255, 0)
    stripes = np.arange(width // 2) % 8 < 4
    array[: height // 2, : width // 2][:, stripes] = (255, 255, 255)
    array[: height // 2, : width // 2][:, ~stripes] = (0, 0, 0)
    return PILImage.fromarray(array)


def _dataset(images: list[PILImage.Image]) -> Dataset:
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"])})
    return Dataset.from_dict(
        {"image": images, "label": [i % 2 for i in range(len(images))]}, features=features
    )


def test_boxes_lie_in_the_original_image_with_the_allowed_area_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(500):
        left, top, right, bottom = random_resized_crop_box(320, 200, rng, (0.2, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left < right <= 320 and 0 <= top < bottom <= 200
        area = (right - left) * (bottom - top) / (320 * 200)
        assert 0.19 <= area <= 1.0
        assert 3 / 4 - 0.02 <= (right - left) / (bottom - top) <= 4 / 3 + 0.02
    # a box that cannot fit falls back to the largest central box of an allowed ratio
    assert random_resized_crop_box(1000, 10, rng, (0.99, 1.0), (3 / 4, 4 / 3)) == (493, 0, 506, 10)


def test_a_crop_is_cut_from_the_full_resolution_image():
    """The transform equals cropping the original at the drawn box and resizing that (bicubic). Resizing the
    whole image to the model size first (the old pipeline) averages the stripes away; the crop keeps them."""
    original = _quadrants()
    transform = ImageTransform(32, 3, "random-resized", scale=(0.05, 0.05), hflip=False)
    striped = 0
    for index in range(40):
        out = transform(original, np.random.default_rng([0, 0, index]))
        assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
        box = random_resized_crop_box(320, 200, np.random.default_rng([0, 0, index]), (0.05, 0.05))
        reference = original.crop(box).resize((32, 32), PILImage.Resampling.BICUBIC)
        expected = torch.from_numpy(np.asarray(reference).copy()).permute(2, 0, 1)
        inner = (slice(None), slice(2, -2), slice(2, -2))  # bicubic taps at the border reach past the box
        assert (out[inner].int() - expected[inner].int()).abs().max() <= 2, index
        if box[2] <= 160 and box[3] <= 100:  # entirely in the striped quadrant
            striped += 1
            shrunk = original.resize((32, 32), PILImage.Resampling.BICUBIC)
            scaled = (box[0] / 10, box[1] / 6.25, box[2] / 10, box[3] / 6.25)
            old = np.asarray(shrunk.resize((32, 32), PILImage.Resampling.BICUBIC, box=scaled))
            assert out[1].float().std() > 80 > 4 * old[..., 1].std()
    assert striped >= 3


def test_samples_depend_on_seed_epoch_and_index_only_not_on_workers():
    images = [_quadrants(300 + 7 * i, 200 + 3 * i) for i in range(12)]
    data = TrainImages(_dataset(images), "image", ImageTransform(24, 3), "label", seed=5)
    batches = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=workers)
        batches[workers] = list(loader)
    for serial, parallel in zip(batches[0], batches[2], strict=True):
        assert serial["pixel_values"].dtype == torch.uint8
        assert torch.equal(serial["pixel_values"], parallel["pixel_values"])
        assert torch.equal(serial["labels"], parallel["labels"])
    first = data[3]["pixel_values"]
    assert torch.equal(first, data.__getitems__([1, 3])[1]["pixel_values"])
    data.set_epoch(1)
    assert not torch.equal(first, data[3]["pixel_values"])


def test_a_corrupt_file_is_named():
    good = io.BytesIO()
    _quadrants().save(good, format="PNG")
    broken = good.getvalue()[:200]
    dataset = Dataset.from_dict(
        {"image": [{"bytes": good.getvalue(), "path": "ok.png"}, {"bytes": broken, "path": "bad_0042.png"}]},
        features=Features({"image": Image()}),
    )
    data = TrainImages(dataset, "image", ImageTransform(16, 3))
    assert data[0]["pixel_values"].shape == (3, 16, 16)
    with pytest.raises(OSError, match=r"bad_0042\.png"):
        data[1]


def test_normalisation_follows_the_processor_else_imagenet():
    class Processor:
        image_mean, image_std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]

    assert normalization_stats(3, Processor()) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    mean, std = normalization_stats(3)
    assert mean == pytest.approx((0.485, 0.456, 0.406)) and std == pytest.approx((0.229, 0.224, 0.225))
    assert normalization_stats(1)[0] == pytest.approx((np.mean((0.485, 0.456, 0.406)),))
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(2, 3, 1, 3)
    out = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(images, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    expected = (torch.tensor([0, 128, 255]) / 255 - 0.5) / 0.25
    torch.testing.assert_close(out[0, 0, 0].float(), expected, atol=2e-2, rtol=0)
