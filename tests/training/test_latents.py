"""VAE latents: encoding, the scaling factor, the checksummed disk cache and its flips, on a tiny VAE."""

import json
import logging

import numpy as np
import pytest
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image

from hf_resdecay.sampling import scale_latents, unscale_latents
from hf_resdecay.training.images import ImageTransform, TrainImages
from hf_resdecay.training.latents import (
    CachedLatents,
    cache_latents,
    encode_moments,
    latent_geometry,
    latents_from_moments,
    load_vae,
)

from .vae_helpers import save_tiny_vae, tiny_vae


@pytest.fixture(scope="module")
def images() -> Dataset:
    """Six RGB images of different sizes (centre-cropped to 16 px) with labels."""
    rng = np.random.default_rng(0)
    pictures = [
        Image.fromarray(rng.integers(0, 256, size=(18 + i, 16 + 2 * i, 3), dtype=np.uint8)) for i in range(6)
    ]
    data = Dataset.from_dict({"image": pictures, "label": [0, 1, 2, 0, 1, 2]})
    return data.cast_column("image", ImageFeature())


def _pixels(dataset: Dataset, flip: bool = False) -> torch.Tensor:
    transform = ImageTransform(16, 3, "center", hflip=False)
    batch = torch.stack([transform(row["image"], None) for row in dataset])
    return batch.flip(-1) if flip else batch


def test_latents_round_trip_with_the_scaling_factor(tmp_path, images):
    vae = load_vae(str(save_tiny_vae(tmp_path / "vae")))
    assert latent_geometry(vae.config, 16) == (4, 8)
    with pytest.raises(
        ValueError, match="--image_size 15 must be a multiple of the VAE's downsampling factor 2"
    ):
        latent_geometry(vae.config, 15)
    pixels = _pixels(images)
    moments = encode_moments(vae, pixels)
    assert moments.shape == (6, 8, 8, 8) and moments.dtype == torch.float32

    latents = latents_from_moments(moments, vae.config, torch.Generator().manual_seed(0))
    mean, logvar = moments.chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    expected = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise) * 0.5  # the config's scaling_factor
    torch.testing.assert_close(latents, expected)
    with torch.no_grad():
        encoded = vae.encode(pixels.float() / 127.5 - 1).latent_dist.mean
        decoded = vae.decode(unscale_latents(scale_latents(encoded, vae.config), vae.config)).sample
        direct = vae.decode(encoded).sample
    assert decoded.shape == (6, 3, 16, 16)
    torch.testing.assert_close(decoded, direct)  # unscale_latents undoes scale_latents before decoding
    shifted = type("Config", (), {"scaling_factor": 2.0, "shift_factor": 0.25})()
    assert scale_latents(torch.tensor([1.25]), shifted).item() == 2.0
    assert unscale_latents(torch.tensor([2.0]), shifted).item() == 1.25


def test_load_vae_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match=r"--vae .*missing"):
        load_vae(str(tmp_path / "missing"))
    save_tiny_vae(tmp_path / "pipeline" / "vae")  # a pipeline folder: its vae/ subfolder is used
    assert load_vae(str(tmp_path / "pipeline")).config.latent_channels == 4


def test_cache_holds_the_encoder_moments_and_is_checked(tmp_path, images, caplog):
    vae = tiny_vae()
    cache = tmp_path / "cache"
    moments, reused = cache_latents(vae, images, "image", 16, batch_size=4, cache_dir=cache, num_workers=0)
    assert not reused and moments.shape == (6, 2, 8, 8, 8) and isinstance(moments, np.memmap)
    np.testing.assert_allclose(moments[:, 0], encode_moments(vae, _pixels(images)).numpy(), atol=1e-5)
    np.testing.assert_allclose(moments[:, 1], encode_moments(vae, _pixels(images, True)).numpy(), atol=1e-5)

    again, reused = cache_latents(vae, images, "image", 16, batch_size=4, cache_dir=cache, num_workers=0)
    assert reused and np.array_equal(again, moments)
    (entry,) = cache.glob("*.npy")
    record = json.loads(entry.with_suffix(".json").read_text())
    assert record["shape"] == [6, 2, 8, 8, 8]

    expected = np.array(moments)  # the memory map would show the damage below
    data = bytearray(entry.read_bytes())
    data[-4:] = b"\0\0\0\0"  # a damaged entry of the right size
    entry.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        rebuilt, reused = cache_latents(
            vae, images, "image", 16, batch_size=4, cache_dir=cache, num_workers=0
        )
    assert not reused and "SHA-256 differs" in caplog.text
    np.testing.assert_array_equal(rebuilt, expected)

    _, reused = cache_latents(tiny_vae(seed=1), images, "image", 16, cache_dir=cache, num_workers=0)
    assert not reused and len(list(cache.glob("*.npy"))) == 2  # another VAE: another entry
    single, _ = cache_latents(vae, images, "image", 16, hflip=False, cache_dir=cache, num_workers=0)
    assert single.shape == (6, 1, 8, 8, 8)


def test_cached_latents_flip_as_the_image_pipeline_does(tmp_path, images):
    """Cached sample i of epoch e is the encoding of the very image TrainImages yields for (seed, e, i)."""
    vae = tiny_vae()
    moments, _ = cache_latents(vae, images, "image", 16, cache_dir=tmp_path, num_workers=0)
    cached = CachedLatents(moments, images["label"], seed=3)
    pictures = TrainImages(images, "image", ImageTransform(16, 3, "center", hflip=True), "label", seed=3)
    flips = []
    for epoch in (0, 1):
        cached.set_epoch(epoch)
        pictures.set_epoch(epoch)
        for index in range(len(images)):
            sample, picture = cached[index], pictures[index]
            assert sample["labels"] == picture["labels"]
            expected = encode_moments(vae, picture["pixel_values"][None])[0]
            torch.testing.assert_close(sample["latent_moments"], expected, atol=1e-5, rtol=1e-5)
            flips.append(torch.equal(sample["latent_moments"], torch.from_numpy(np.array(moments[index, 1]))))
    assert 0 < sum(flips) < len(flips)  # both orientations occur
    loaded = torch.utils.data.DataLoader(cached, batch_size=3, num_workers=1)  # the map opens in the worker
    assert next(iter(loaded))["latent_moments"].shape == (3, 8, 8, 8)
