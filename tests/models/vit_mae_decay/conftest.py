"""Fixed inputs for the decayed-ViTMAE tests."""

import pytest
import torch

from .helpers import NUM_PATCHES, TINY


@pytest.fixture
def pixel_values() -> torch.Tensor:
    return torch.randn(
        3, 3, TINY["image_size"], TINY["image_size"], generator=torch.Generator().manual_seed(1)
    )


@pytest.fixture
def noise() -> torch.Tensor:
    return torch.rand(3, NUM_PATCHES, generator=torch.Generator().manual_seed(2))
