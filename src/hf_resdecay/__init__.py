"""hf_resdecay: decayed identity shortcuts and residual-alignment analysis for the Hugging Face stack.

Importing the package registers the decayed models with transformers' Auto classes, so
``AutoModel.from_pretrained("org/vitmae-decay")`` works without naming a class. The diffusers models
(``UNet2DDecayModel``, ``DiTDecayTransformer2DModel``) are imported on first access, so diffusers stays an
optional dependency (the ``diffusion`` extra).
"""

from typing import Any

from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

from . import models
from .models import (
    ViTMAEDecayConfig,
    ViTMAEDecayForPreTraining,
    ViTMAEDecayModel,
    ViTMAEDecayPreTrainedModel,
)
from .shortcut import SHORTCUT_SCHEDULES, alpha_eff, shortcut_coefficients

__version__ = "0.1.0"

_DIFFUSERS_MODELS = tuple(models._DIFFUSERS_MODELS)  # one list: models/__init__ imports them lazily


def __getattr__(name: str) -> Any:
    """The diffusers models, imported on first access by ``hf_resdecay.models`` (see the module docstring)."""
    if name in _DIFFUSERS_MODELS:
        return getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names, the lazily imported ones included."""
    return sorted([*globals(), *_DIFFUSERS_MODELS])


def _register_auto_classes() -> None:
    """Make ``model_type="vit_mae_decay"`` resolvable by AutoConfig, AutoModel and AutoModelForPreTraining."""
    AutoConfig.register(ViTMAEDecayConfig.model_type, ViTMAEDecayConfig, exist_ok=True)
    AutoModel.register(ViTMAEDecayConfig, ViTMAEDecayModel, exist_ok=True)
    AutoModelForPreTraining.register(ViTMAEDecayConfig, ViTMAEDecayForPreTraining, exist_ok=True)


_register_auto_classes()

__all__ = [
    "SHORTCUT_SCHEDULES",
    "ViTMAEDecayConfig",
    "ViTMAEDecayForPreTraining",
    "ViTMAEDecayModel",
    "ViTMAEDecayPreTrainedModel",
    "__version__",
    "alpha_eff",
    "shortcut_coefficients",
]
