"""Decayed-shortcut variants of transformers and diffusers models.

The diffusers variants (``UNet2DDecayModel``, ``DiTDecayTransformer2DModel``) are imported on first access,
so that diffusers stays an optional dependency (``pip install "hf_resdecay[diffusion]"``).
"""

from __future__ import annotations

import importlib
from typing import Any

from .vit_mae_decay import (
    ViTMAEDecayConfig,
    ViTMAEDecayForPreTraining,
    ViTMAEDecayModel,
    ViTMAEDecayPreTrainedModel,
)

__all__ = ["ViTMAEDecayConfig", "ViTMAEDecayForPreTraining", "ViTMAEDecayModel", "ViTMAEDecayPreTrainedModel"]

_DIFFUSERS_MODELS = {"UNet2DDecayModel": ".unet_2d_decay", "DiTDecayTransformer2DModel": ".dit_decay"}
"""Lazily imported names and the submodule defining each."""


def __getattr__(name: str) -> Any:
    """Import a diffusers variant on first access; a clear ``ImportError`` when diffusers is missing."""
    if name not in _DIFFUSERS_MODELS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(_DIFFUSERS_MODELS[name], __name__)
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != "diffusers":
            raise
        raise ImportError(
            f"{name} needs diffusers: pip install 'hf_resdecay[diffusion]' (or 'diffusers>=0.30')"
        ) from error
    return getattr(module, name)


def __dir__() -> list[str]:
    """The module's names, the lazily imported ones included."""
    return sorted([*globals(), *_DIFFUSERS_MODELS])
