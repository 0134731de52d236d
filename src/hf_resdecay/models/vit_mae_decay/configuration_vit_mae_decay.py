"""Configuration of ViTMAE with decayed identity shortcuts (arXiv 2404.10947)."""

from huggingface_hub.dataclasses import strict
from transformers import ViTMAEConfig

try:
    from hf_resdecay.shortcut import validate_shortcut_decay, validate_shortcut_schedule
except ImportError:  # loaded with trust_remote_code=True, next to a copy of shortcut.py
    from .shortcut import validate_shortcut_decay, validate_shortcut_schedule


INITIALIZERS: tuple[str, ...] = ("mae", "transformers")
"""Values of ``ViTMAEDecayConfig.initializer``: the release's xavier-uniform, or upstream ViTMAE's normal."""


@strict
class ViTMAEDecayConfig(ViTMAEConfig):
    r"""[`ViTMAEConfig`] plus the decayed-shortcut recipe of the authors' released MAE code.

    Encoder sublayer ``k`` (attention and MLP counted separately) computes ``x = alpha_k * x + f(LN(x))``
    with ``alpha_k`` from [`~hf_resdecay.shortcut_coefficients`]. The defaults are the released recipe,
    initialised as released (``initializer="mae"``, ``layer_norm_eps=1e-6``); ``shortcut_decay=0`` with
    the three flags off computes exactly what upstream ViTMAE computes on the same weights (upstream's own
    defaults are ``initializer="transformers"`` and ``layer_norm_eps=1e-12``).

    Args:
        shortcut_decay (`float`, *optional*, defaults to 0.3):
            ``1 - alpha_min``, in ``[0, 1)``. 0.3 (``alpha_min`` 0.7) is the authors' released MAE setting.
        shortcut_schedule (`str`, *optional*, defaults to `"linear"`):
            One of ``"linear"`` (the paper), ``"cosine"``, ``"constant"``.
        encoder_final_layernorm (`bool`, *optional*, defaults to `False`):
            Keep the encoder's final LayerNorm. The recipe removes it: features are the raw output of
            the last encoder block.
        zero_init_residual_branches (`bool`, *optional*, defaults to `True`):
            Zero-initialise the output projection of every residual branch (attention output and MLP
            output, encoder and decoder) and the decoder's pixel head.
        decoder_skip_connections (`bool`, *optional*, defaults to `True`):
            U-Net style encoder-to-decoder skips: the decoder starts from a learned token, and the
            outputs of every second encoder block (counted back from the last) feed the first decoder
            blocks in reverse order. The paper's ablation shows the decay needs them.
        initializer (`str`, *optional*, defaults to `"mae"`):
            How fresh weights are drawn. ``"mae"``: every ``Linear`` xavier-uniform with zero bias, the
            query/key/value projections with the fan of MAE's packed ``qkv`` matrix, as the authors' release
            and facebookresearch/mae initialise. ``"transformers"``: upstream ViTMAE's
            ``normal(0, initializer_range)``. Both keep the sin-cos positions, the xavier patch embedding
            and ``normal(0, 0.02)`` tokens.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            The release's LayerNorm epsilon (upstream ViTMAE defaults to 1e-12).
    """

    model_type = "vit_mae_decay"

    shortcut_decay: float | int = 0.3
    shortcut_schedule: str = "linear"
    encoder_final_layernorm: bool = False
    zero_init_residual_branches: bool = True
    decoder_skip_connections: bool = True
    initializer: str = "mae"
    layer_norm_eps: float = 1e-6

    def __post_init__(self, **kwargs):
        self.validate_shortcut()
        self.validate_geometry()
        super().__post_init__(**kwargs)

    def validate_shortcut(self):
        """Reject a ``shortcut_decay`` or ``mask_ratio`` outside ``[0, 1)``, or an unknown schedule or
        initializer (a ``mask_ratio`` of 1.5 used to mask like 0.5, and a negative one to give NaN losses)."""
        validate_shortcut_decay(self.shortcut_decay)
        validate_shortcut_schedule(self.shortcut_schedule)
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(
                f"mask_ratio must be in [0, 1) (the fraction of patches hidden from the encoder); "
                f"got {self.mask_ratio!r}"
            )
        if self.initializer not in INITIALIZERS:
            allowed = ", ".join(repr(name) for name in INITIALIZERS)
            raise ValueError(f"initializer must be one of {allowed}; got {self.initializer!r}")

    def validate_geometry(self):
        """Reject an image that is not a whole number of patches, or a width that the heads cannot split.

        Upstream ViTMAE accepts both and fails later: the patch embedding crops the remainder of the image
        silently, and the attention raises a reshape error at the first forward pass.
        """
        image_size = self.image_size if isinstance(self.image_size, (list, tuple)) else (self.image_size,) * 2
        patch_size = self.patch_size if isinstance(self.patch_size, (list, tuple)) else (self.patch_size,) * 2
        if any(patch < 1 for patch in patch_size):
            raise ValueError(f"patch_size must be >= 1; got {self.patch_size!r}")
        if any(size % patch for size, patch in zip(image_size, patch_size, strict=True)):
            raise ValueError(
                f"image_size={self.image_size!r} must be divisible by patch_size={self.patch_size!r}: the "
                "image is cut into whole patches"
            )
        for width, heads in (
            ("hidden_size", "num_attention_heads"),
            ("decoder_hidden_size", "decoder_num_attention_heads"),
        ):
            if getattr(self, heads) < 1 or getattr(self, width) % getattr(self, heads):
                raise ValueError(
                    f"{width}={getattr(self, width)} must be divisible by {heads}={getattr(self, heads)}: "
                    "each head takes an equal slice of the width"
                )

    @property
    def num_decoder_skip_connections(self) -> int:
        """How many encoder blocks feed the decoder: every second one from the last, one per decoder block."""
        if not self.decoder_skip_connections:
            return 0
        return min((self.num_hidden_layers + 1) // 2, self.decoder_num_hidden_layers)


__all__ = ["INITIALIZERS", "ViTMAEDecayConfig"]
