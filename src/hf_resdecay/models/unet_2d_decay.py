"""diffusers' ``UNet2DModel`` with decayed identity shortcuts (arXiv 2404.10947).

Only the residual additions change. Every ``ResnetBlock2D`` computes
``(alpha * shortcut + branch) / output_scale_factor`` and every residual ``Attention``
``(alpha * x + branch) / rescale_output_factor``, with ``alpha`` from
:func:`~hf_resdecay.shortcut_coefficients` over all residual units in forward order (down blocks, mid
block, up blocks). The UNet's own encoder-to-decoder skips are left as they are.

The units are diffusers' own modules with their class switched to the small subclasses below, so the
state-dict keys are upstream's and stock checkpoints load unchanged. Saving writes ``auto_map`` and this
file (plus ``shortcut.py``) next to the weights, for ``diffusers.AutoModel.from_pretrained(path,
trust_remote_code=True)`` where ``hf_resdecay`` is not installed.
"""

from __future__ import annotations

import os
from itertools import zip_longest

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 (see UNet2DDecayModel's docstring)
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d import UNet2DModel, UNet2DOutput
from diffusers.models.unets.unet_2d_blocks import (
    AttnDownBlock2D,
    AttnSkipDownBlock2D,
    AttnSkipUpBlock2D,
    AttnUpBlock2D,
    DownBlock2D,
    ResnetDownsampleBlock2D,
    ResnetUpsampleBlock2D,
    SkipDownBlock2D,
    SkipUpBlock2D,
    UNetMidBlock2D,
    UpBlock2D,
)
from torch import nn

try:
    from hf_resdecay.shortcut import (
        ship_code_files,
        shortcut_coefficients,
        validate_shortcut_decay,
        validate_shortcut_schedule,
    )
except ImportError:  # loaded with trust_remote_code=True, next to a copy of shortcut.py
    from .shortcut import (
        ship_code_files,
        shortcut_coefficients,
        validate_shortcut_decay,
        validate_shortcut_schedule,
    )

_INTERLEAVED_BLOCKS = (
    DownBlock2D,
    AttnDownBlock2D,
    ResnetDownsampleBlock2D,
    SkipDownBlock2D,
    AttnSkipDownBlock2D,
    UpBlock2D,
    AttnUpBlock2D,
    ResnetUpsampleBlock2D,
    SkipUpBlock2D,
)
"""Blocks whose forward runs ``resnets[i]`` then ``attentions[i]`` (if any), then a resampling resnet."""


def _check_sample(
    sample: torch.Tensor, channels: int, dtype: torch.dtype, multiple: int, why: str, name: str = "sample"
) -> None:
    """Raise a ``ValueError`` naming the expected shape or dtype when ``sample`` cannot feed the model.

    Reads shapes and dtypes only, so under ``torch.compile`` the checks are guards, not graph breaks.
    Autocast lets a tensor of another floating dtype through, as the layers then convert it.
    """
    expected = f"(batch, {channels}, height, width) with height and width multiples of {multiple} ({why})"
    shape = tuple(sample.shape)
    if sample.ndim != 4 or shape[1] != channels:
        raise ValueError(f"{name} must have shape {expected}; got {shape}")
    if shape[0] == 0:
        raise ValueError(f"{name} must hold at least one image, shape {expected}; got {shape}")
    if shape[2] % multiple or shape[3] % multiple:
        raise ValueError(f"{name} must have shape {expected}; got {shape}")
    autocast = torch.is_autocast_enabled(sample.device.type)
    if not sample.is_floating_point() or (sample.dtype != dtype and not autocast):
        raise ValueError(
            f"{name} must be a floating-point tensor of dtype {dtype} (the model's dtype); got {sample.dtype}"
        )


class ResnetBlock2DDecay(ResnetBlock2D):
    """``ResnetBlock2D`` returning ``(alpha * shortcut + branch) / output_scale_factor``.

    The branch is upstream's, line for line; the sum is one fused ``torch.add(branch, shortcut,
    alpha=alpha)``, which with ``alpha = 1`` is upstream's ``shortcut + branch`` exactly.
    """

    shortcut_alpha: float = 1.0

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
        """Adapted from `diffusers.models.resnet.ResnetBlock2D.forward` (diffusers 0.42).

        Differs in the final sum, which scales the shortcut by ``alpha``, and in ignoring the deprecated
        ``scale`` argument without upstream's deprecation warning.
        """
        hidden_states = self.nonlinearity(self.norm1(input_tensor))
        if self.upsample is not None:
            if hidden_states.shape[0] >= 64:  # as upstream: upsample_nearest_nhwc fails on large batches
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)
        hidden_states = self.conv1(hidden_states)

        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        if self.time_embedding_norm == "default":
            if temb is not None:
                hidden_states = hidden_states + temb
            hidden_states = self.norm2(hidden_states)
        elif self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError("temb is required when time_embedding_norm='scale_shift'")
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)
            hidden_states = self.norm2(hidden_states) * (1 + time_scale) + time_shift
        else:
            hidden_states = self.norm2(hidden_states)
        hidden_states = self.conv2(self.dropout(self.nonlinearity(hidden_states)))

        if self.conv_shortcut is not None:
            if self.training:  # as upstream: avoids a DDP gradient-stride warning
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)
        return torch.add(hidden_states, input_tensor, alpha=self.shortcut_alpha) / self.output_scale_factor

    def extra_repr(self) -> str:
        return f"shortcut_alpha={self.shortcut_alpha:.4f}"


class AttentionDecay(Attention):
    """Residual ``Attention`` returning ``(alpha * x + branch) / rescale_output_factor``.

    The module's ``residual_connection`` is switched off and its ``rescale_output_factor`` set to 1, so
    any attention processor computes the branch alone; the shortcut and the original rescale
    (``shortcut_rescale``) are applied here. With ``alpha = 1`` this is upstream's result exactly.
    """

    shortcut_alpha: float = 1.0
    shortcut_rescale: float = 1.0

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **cross_attention_kwargs,
    ) -> torch.Tensor:
        """The processor's branch, then the residual and rescale steps it would have applied, decayed.

        The last two steps are adapted from the end of
        `diffusers.models.attention_processor.AttnProcessor2_0.__call__` (diffusers 0.42):
        ``(hidden_states + residual) / rescale_output_factor`` there, with the shortcut scaled by ``alpha``
        here. The shortcut is the module's input, which is what diffusers' processors add back as well.
        """
        branch = super().forward(
            hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs
        )
        output = torch.add(branch, hidden_states, alpha=self.shortcut_alpha)
        return output if self.shortcut_rescale == 1 else output / self.shortcut_rescale

    def extra_repr(self) -> str:
        return f"shortcut_alpha={self.shortcut_alpha:.4f}"


def _block_residual_units(block: nn.Module) -> list[nn.Module]:
    """The residual units of one UNet block, in the order its forward runs them.

    The orders are read from the ``forward`` methods of the supported blocks in
    ``diffusers.models.unets.unet_2d_blocks`` (diffusers 0.42).
    """
    resnets = list(block.resnets)
    attentions = list(getattr(block, "attentions", None) or ())
    if isinstance(block, UNetMidBlock2D):
        units = resnets[:1] + [unit for pair in zip(attentions, resnets[1:], strict=True) for unit in pair]
    elif isinstance(block, AttnSkipUpBlock2D):  # all resnets, then its single attention
        units = resnets + attentions
    elif isinstance(block, _INTERLEAVED_BLOCKS):
        units = [unit for pair in zip_longest(resnets, attentions) for unit in pair]
    else:
        raise NotImplementedError(
            f"UNet2DDecayModel does not know the forward order of {type(block).__name__}; supported blocks: "
            f"{', '.join(cls.__name__ for cls in (*_INTERLEAVED_BLOCKS, AttnSkipUpBlock2D, UNetMidBlock2D))}"
        )
    for name in ("downsamplers", "upsamplers"):
        units += [module for module in getattr(block, name, None) or () if isinstance(module, ResnetBlock2D)]
    units += [getattr(block, name, None) for name in ("resnet_down", "resnet_up")]
    return [unit for unit in units if unit is not None]


def residual_units(unet: UNet2DModel) -> list[nn.Module]:
    """Every ``ResnetBlock2D`` and residual ``Attention`` of ``unet`` in forward order: down, mid, up."""
    blocks = [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]
    return [unit for block in blocks for unit in _block_residual_units(block)]


def _decay_unit(unit: nn.Module, alpha: float) -> None:
    """Switch a diffusers residual unit to its decayed subclass in place (same parameters, same keys)."""
    if isinstance(unit, Attention):
        if type(unit) is Attention:
            if not unit.residual_connection:
                raise ValueError("only residual attention layers take a decayed shortcut")
            unit.__class__ = AttentionDecay
            unit.shortcut_rescale = float(unit.rescale_output_factor)
            unit.residual_connection, unit.rescale_output_factor = False, 1.0
    elif type(unit) is ResnetBlock2D:
        unit.__class__ = ResnetBlock2DDecay
    if not isinstance(unit, (AttentionDecay, ResnetBlock2DDecay)):
        raise NotImplementedError(f"cannot decay the shortcut of {type(unit).__name__}")
    unit.shortcut_alpha = float(alpha)


class UNet2DDecayModel(UNet2DModel):
    r"""[`UNet2DModel`] whose residual units decay their identity shortcuts (arXiv 2404.10947).

    Residual unit ``k`` (each ``ResnetBlock2D`` and each residual attention, counted in forward order
    through the down blocks, the mid block and the up blocks) computes
    ``(alpha_k * shortcut + branch) / output_scale_factor``. ``shortcut_decay=0`` is upstream exactly,
    with the same state-dict keys, so ``UNet2DDecayModel.from_pretrained(stock_dir, shortcut_decay=0.2)``
    retrofits a stock checkpoint.

    Loading a decayed checkpoint into the plain [`UNet2DModel`] silently drops the decay: the weights
    load (the keys are the same), diffusers only logs that ``shortcut_decay`` and ``shortcut_schedule``
    are unexpected config attributes, and the model computes identity shortcuts.

    Saved checkpoints carry ``auto_map`` and the code, so ``diffusers.AutoModel.from_pretrained(path,
    trust_remote_code=True)`` loads them without ``hf_resdecay``. A pipeline saved with this UNet records
    it in ``model_index.json`` as ``["hf_resdecay.models.unet_2d_decay", "UNet2DDecayModel"]``, and
    ``DiffusionPipeline.from_pretrained`` only resolves that module if the caller has imported it
    (``from hf_resdecay import UNet2DDecayModel``) beforehand; diffusers then finds the load method through
    the ``ModelMixin`` name this module imports.

    diffusers' ``AutoModel`` asks for ``trust_remote_code=True`` whenever ``auto_map`` is present, and then
    runs the saved copy of this file even where the package is installed; with the package, load through
    ``UNet2DDecayModel.from_pretrained``. To load a saved pipeline without the package, set its
    ``model_index.json`` entry to ``["unet_2d_decay", "UNet2DDecayModel"]`` (the code file in ``unet/``) and
    pass ``trust_remote_code=True``.

    Args (besides [`UNet2DModel`]'s):
        shortcut_decay (`float`, *optional*, defaults to 0.2):
            ``1 - alpha_min``, in ``[0, 1)``. 0.2 (``alpha_min`` 0.8) is the paper's diffusion setting.
        shortcut_schedule (`str`, *optional*, defaults to `"linear"`):
            One of ``"linear"`` (the paper), ``"cosine"``, ``"constant"``.
    """

    _no_split_modules = ["ResnetBlock2DDecay", "AttentionDecay"]  # FSDP shard groups (configs/fsdp.yaml)

    _auto_class = "AutoModel"  # diffusers writes auto_map = {"AutoModel": "unet_2d_decay.UNet2DDecayModel"}

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = (
            "DownBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
        ),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,
        shortcut_decay: float = 0.2,
        shortcut_schedule: str = "linear",
    ):
        """Build upstream's UNet, then switch every residual unit to its decayed subclass.

        The upstream parameters are spelled out because diffusers reads the config keys from this signature
        (``register_to_config`` records their defaults, ``extract_init_dict`` decides what a saved config may
        set); ``tests/models/test_upstream_signatures.py`` keeps them equal to upstream's.
        """
        validate_shortcut_decay(shortcut_decay)
        validate_shortcut_schedule(shortcut_schedule)
        multiple = 2 ** (len(block_out_channels) - 1)
        sizes = sample_size if isinstance(sample_size, (list, tuple)) else (sample_size,)
        if any(size is not None and size % multiple for size in sizes):
            raise ValueError(
                f"sample_size={sample_size!r} must be divisible by {multiple} (2 ** (len(block_out_channels) "
                "- 1)): the UNet halves the image that often and doubles it back"
            )
        super().__init__(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            center_input_sample=center_input_sample,
            time_embedding_type=time_embedding_type,
            time_embedding_dim=time_embedding_dim,
            freq_shift=freq_shift,
            flip_sin_to_cos=flip_sin_to_cos,
            down_block_types=down_block_types,
            mid_block_type=mid_block_type,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            mid_block_scale_factor=mid_block_scale_factor,
            downsample_padding=downsample_padding,
            downsample_type=downsample_type,
            upsample_type=upsample_type,
            dropout=dropout,
            act_fn=act_fn,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            attn_norm_num_groups=attn_norm_num_groups,
            norm_eps=norm_eps,
            resnet_time_scale_shift=resnet_time_scale_shift,
            add_attention=add_attention,
            class_embed_type=class_embed_type,
            num_class_embeds=num_class_embeds,
            num_train_timesteps=num_train_timesteps,
        )
        units = residual_units(self)
        for unit, alpha in zip(
            units, shortcut_coefficients(len(units), shortcut_decay, shortcut_schedule), strict=True
        ):
            _decay_unit(unit, alpha)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        """``UNet2DModel.forward`` after a clear check of ``sample``'s shape and dtype."""
        _check_sample(
            sample,
            self.config.in_channels,
            self.conv_in.weight.dtype,
            2 ** (len(self.config.block_out_channels) - 1),
            "2 ** (len(block_out_channels) - 1): the UNet halves them that often and doubles them back",
        )
        return super().forward(sample, timestep, class_labels=class_labels, return_dict=return_dict)

    @property
    def shortcut_coefficients(self) -> list[float]:
        """The shortcut coefficients in use, one per residual unit in forward order (down, mid, up)."""
        return [unit.shortcut_alpha for unit in residual_units(self)]

    @classmethod
    def extract_init_dict(cls, config_dict: dict, **kwargs) -> tuple[dict, dict, dict]:
        """As diffusers does, minus the ``auto_map`` entry (code metadata, not an ``__init__`` argument)."""
        config_dict = {key: value for key, value in config_dict.items() if key != "auto_map"}
        return super().extract_init_dict(config_dict, **kwargs)

    def save_pretrained(
        self, save_directory: str | os.PathLike, is_main_process: bool = True, **kwargs
    ) -> None:
        """Save as diffusers does, plus this file and ``shortcut.py`` for ``trust_remote_code``."""
        if is_main_process:  # copied first: with push_to_hub=True diffusers uploads the folder as it saves
            ship_code_files(save_directory, __name__)
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)


__all__ = ["AttentionDecay", "ResnetBlock2DDecay", "UNet2DDecayModel", "residual_units"]
