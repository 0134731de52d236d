"""ViTMAE with decayed identity shortcuts."""

from .configuration_vit_mae_decay import ViTMAEDecayConfig
from .modeling_vit_mae_decay import (
    ViTMAEDecayForPreTraining,
    ViTMAEDecayModel,
    ViTMAEDecayPreTrainedModel,
)

__all__ = ["ViTMAEDecayConfig", "ViTMAEDecayForPreTraining", "ViTMAEDecayModel", "ViTMAEDecayPreTrainedModel"]
