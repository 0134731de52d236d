"""Decayed-shortcut variants of transformers and diffusers models."""

from .vit_mae_decay import (
    ViTMAEDecayConfig,
    ViTMAEDecayForPreTraining,
    ViTMAEDecayModel,
    ViTMAEDecayPreTrainedModel,
)

__all__ = ["ViTMAEDecayConfig", "ViTMAEDecayForPreTraining", "ViTMAEDecayModel", "ViTMAEDecayPreTrainedModel"]
