"""VAE latents for latent diffusion (the paper's SiT setting): the VAE, encoding on the device, a disk cache.

A DiT learns ``scale_latents(z)``, ``z`` drawn from the VAE encoder's Gaussian ``N(mean, exp(logvar))`` for
the image, as in SiT/DiT training (Stable Diffusion's VAE: 8x smaller, 4 channels, scale 0.18215). The
encoder's output, the *moments* ``(mean, logvar)``, is the same at every epoch; only the draw differs. So
:func:`cache_latents` encodes every training image once (and its mirror image when the run flips) and keeps
the moments on disk, and training draws ``z`` from them with the step's generator: the same computation as
encoding each batch, without running the encoder again.

The cache entry is one ``.npy`` file of shape ``(images, flips, 2 * latent_channels, size, size)`` (float32),
written through :func:`~hf_resdecay.atomic.atomic_write` and then recorded with its SHA-256 in a ``.json``
beside it, keyed by the VAE's weights, the dataset's fingerprint and the geometry, as the feature cache of
:mod:`hf_resdecay.evaluation.features` does: an entry that fails the check is named, deleted and rebuilt.
It is read memory-mapped, so a dataset larger than the RAM trains from it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..assets import default_cache_dir, sha256_of
from ..atomic import atomic_write, write_json_atomic
from ..evaluation.features import _model_fingerprint
from ..sampling import scale_latents
from .images import BAD_IMAGES, ImageTransform, TrainImages, collate, default_num_workers

logger = logging.getLogger(__name__)

__all__ = [
    "CachedLatents",
    "cache_latents",
    "encode_moments",
    "latent_geometry",
    "latent_loader",
    "latents_from_moments",
    "load_vae",
]


def load_vae(name_or_path: str, device: torch.device | str | None = None, revision: str | None = None):
    """A diffusers ``AutoencoderKL`` from a Hub id or folder (or the ``vae/`` subfolder of a pipeline), in
    eval mode with gradients off. ``ValueError`` naming ``--vae`` when it cannot be loaded."""
    from diffusers import AutoencoderKL

    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        in_vae = not (folder / "config.json").is_file() and (folder / "vae").is_dir()
        subfolders = ["vae"] if in_vae else [None]
    else:
        subfolders = [None, "vae"]  # a VAE repo, or a pipeline repo keeping its VAE in vae/
    first_error = None
    for subfolder in subfolders:
        try:
            vae = AutoencoderKL.from_pretrained(str(name_or_path), subfolder=subfolder, revision=revision)
        except (OSError, ValueError, TypeError) as error:
            first_error = first_error or error
            continue
        return vae.requires_grad_(False).eval().to(device or "cpu")
    raise ValueError(f"--vae {name_or_path}: {' '.join(str(first_error).split())}")


def latent_geometry(vae_config: Any, image_size: int) -> tuple[int, int]:
    """``(latent_channels, latent_size)`` of ``image_size`` images: the encoder halves the size once per
    block but the last. ``ValueError`` when ``image_size`` is not a multiple of that factor."""
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    if image_size % factor:
        raise ValueError(
            f"--image_size {image_size} must be a multiple of the VAE's downsampling factor {factor}"
        )
    return int(vae_config.latent_channels), image_size // factor


def encode_moments(vae, pixels: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The encoder's Gaussian parameters ``(mean, logvar)`` stacked on channels, (N, 2 * latent_channels,
    h, w) in float32, of uint8 (N, C, H, W) images (mapped to [-1, 1] as the VAE was trained)."""
    device = next(vae.parameters()).device
    images = (pixels.to(device).float() / 127.5 - 1).to(next(vae.parameters()).dtype)
    with torch.no_grad(), torch.autocast(device.type, autocast_dtype, enabled=autocast_dtype is not None):
        return vae.encode(images).latent_dist.parameters.float()


def latents_from_moments(
    moments: torch.Tensor, vae_config: Any, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Scaled latents (:func:`~hf_resdecay.sampling.scale_latents`) drawn from the encoder's Gaussian with
    ``generator``: what the denoiser trains on."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return scale_latents(DiagonalGaussianDistribution(moments.float()).sample(generator), vae_config)


def _cache_key(vae, dataset, image_column: str, image_size: int, flips: int) -> str:
    parts = {
        "vae": _model_fingerprint(vae),
        "dataset": getattr(dataset, "_fingerprint", None),
        "rows": len(dataset),
        "image_column": image_column,
        "image_size": image_size,
        "flips": flips,
        "crop": "center",
        "format": "moments-float32-v1",
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _record_path(cache_file: Path) -> Path:
    return cache_file.with_suffix(".json")


def _read_entry(cache_file: Path, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The memory-mapped moments when the entry matches its recorded SHA-256 and shape; else None (a bad
    entry is logged in one line and deleted, so the caller rebuilds it)."""
    record_path = _record_path(cache_file)
    if not cache_file.exists() and not record_path.exists():
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or record.get("key") != key or "sha256" not in record:
            raise ValueError(f"{record_path.name} does not record this entry's key and SHA-256")
        if sha256_of(cache_file) != record["sha256"]:
            raise ValueError("its SHA-256 differs from the one recorded when it was written")
        array = np.load(cache_file, mmap_mode="r", allow_pickle=False)
        if array.shape != shape or array.dtype != np.float32:
            raise ValueError(f"it holds {array.dtype} {array.shape}, not float32 {shape}")
    except Exception as error:  # whatever is wrong with an entry, rebuilding it fixes it
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        logger.warning(f"latent cache {cache_file} is unusable ({reason}); encoding the images again")
        for path in (cache_file, record_path):
            path.unlink(missing_ok=True)
        return None
    return array


def cache_latents(
    vae,
    dataset,
    image_column: str,
    image_size: int,
    hflip: bool = True,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int | None = None,
    skip_bad_images: bool = False,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, bool]:
    """The encoder moments of every image of ``dataset`` (centre crop to ``image_size``; with ``hflip``, of
    its mirror image too), as a read-only memory map of shape ``(images, 1 or 2, 2 * latent_channels, size,
    size)``; and whether they came from the disk cache.

    Encodes on the VAE's device, in ``batch_size`` batches decoded by ``num_workers`` workers; the entry is
    written once under ``cache_dir`` (default: the package cache's ``latents/``) and reused while the VAE,
    the dataset and the geometry are the same. An image that does not decode raises ``ValueError`` naming
    it; with ``skip_bad_images`` the next image that decodes stands in for it, as in training.
    """
    channels, size = latent_geometry(vae.config, image_size)
    flips = 2 if hflip else 1
    shape = (len(dataset), flips, 2 * channels, size, size)
    key = _cache_key(vae, dataset, image_column, image_size, flips)
    cache_file = Path(cache_dir or default_cache_dir() / "latents") / f"{key}.npy"
    cached = _read_entry(cache_file, key, shape)
    if cached is not None:
        return cached, True

    transform = ImageTransform(image_size, vae.config.in_channels, "center", hflip=False)
    images = TrainImages(dataset, image_column, transform, skip_bad_images=skip_bad_images)
    workers = default_num_workers() if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(
        images, batch_size=batch_size, collate_fn=collate, num_workers=workers
    )
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header,
        {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
            "fortran_order": False,
            "shape": shape,
        },
    )
    digest = hashlib.sha256(header.getvalue())
    _record_path(cache_file).unlink(missing_ok=True)  # a reader never pairs a new file with an old record
    with atomic_write(cache_file, "wb") as handle:
        handle.write(header.getvalue())
        for batch in tqdm(loader, desc="encoding latents", unit="batch", disable=not progress):
            bad = batch.pop(BAD_IMAGES, None)
            if bad and not skip_bad_images:
                raise ValueError(
                    f"cannot decode the image {bad[0]}: fix or remove it, or pass --skip_bad_images"
                )
            pixels = batch["pixel_values"]
            views = [pixels, pixels.flip(-1)] if hflip else [pixels]  # the flip a training step would make
            moments = torch.stack([encode_moments(vae, view, autocast_dtype) for view in views], dim=1)
            data = moments.cpu().numpy().astype(np.float32, copy=False).tobytes()
            digest.update(data)
            handle.write(data)
    write_json_atomic(
        {"key": key, "sha256": digest.hexdigest(), "shape": list(shape)}, _record_path(cache_file)
    )
    return np.load(cache_file, mmap_mode="r", allow_pickle=False), False


class CachedLatents(torch.utils.data.Dataset):
    """Training samples ``{"latent_moments": float32 (2c, h, w)[, "labels"]}`` from :func:`cache_latents`.

    Sample ``index`` of epoch ``epoch`` is the mirror image when ``numpy.random.default_rng([seed, epoch,
    index]).random() < 0.5`` (with ``hflip``): the draw :class:`~hf_resdecay.training.images.TrainImages`
    makes for a centre-cropped image, so cached and uncached runs see the same flips. The memory map is
    opened in each DataLoader worker, never pickled.
    """

    skip_bad_images = False  # images were checked when the cache was built

    def __init__(self, moments: np.ndarray, labels: np.ndarray | None = None, seed: int = 0):
        self.path = Path(moments.filename) if isinstance(moments, np.memmap) else None
        self._moments = None if self.path is not None else moments
        self.flips = moments.shape[1]
        self.length = len(moments)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        if self.labels is not None and len(self.labels) != self.length:
            raise ValueError(f"{len(self.labels)} labels for {self.length} cached latents")
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_moments": None if self.path is not None else self._moments}

    def _array(self) -> np.ndarray:
        if self._moments is None:
            self._moments = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return self._moments

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        flip = 0
        if self.flips == 2:
            flip = int(np.random.default_rng([self.seed, self.epoch, index]).random() < 0.5)
        sample = {"latent_moments": torch.from_numpy(np.array(self._array()[index, flip]))}
        if self.labels is not None:
            sample["labels"] = int(self.labels[index])
        return sample


def latent_loader(accelerator, data: CachedLatents, args) -> torch.utils.data.DataLoader:
    """A shuffled loader of cached latents prepared by Accelerate (its seedable sampler orders it), with the
    options :func:`~hf_resdecay.training.images.training_loader` gives image loaders."""
    workers = args.dataloader_num_workers
    if workers is None:
        workers = default_num_workers(int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        collate_fn=collate,
        drop_last=True,
        num_workers=workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    return accelerator.prepare(loader)
