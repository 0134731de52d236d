"""A tiny randomly initialised ``AutoencoderKL`` built from a config: latent diffusion without a download."""

from pathlib import Path

import torch

TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 16,
    "scaling_factor": 0.5,
}
"""2x downsampling, 4 latent channels, and a scaling factor that is not 1 (so forgetting it shows)."""


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_VAE).eval()


def save_tiny_vae(folder: Path, seed: int = 0) -> Path:
    """Save :func:`tiny_vae` to ``folder`` (what ``--vae <folder>`` loads); returns the folder."""
    tiny_vae(seed).save_pretrained(folder)
    return folder
