"""diffusers' ``DiTTransformer2DModel`` with decayed shortcuts and U-ViT long skips (arXiv 2404.10947).

The paper's diffusion backbone (SiT: DiT trained with flow matching) decays the shortcuts of *all* blocks:
sublayer ``k`` (attention and MLP counted separately through the whole stack) computes
``x = alpha_k * x + gate * f(adaLN(x))`` with ``alpha_k`` from :func:`~hf_resdecay.shortcut_coefficients`,
and adds U-ViT-style long skips: the first half of the blocks is the encoder, and each block of the second
half first adds ``Linear(skip)`` of its mirrored encoder block's output. A fresh model is initialised as the
authors' SiT release initialises (xavier-uniform Linears, the skip projections included; zeroed adaLN and
output head); a retrofitted stock checkpoint gets zero skip projections, so it starts as the stock stack.

Saving writes ``auto_map`` and this file (plus ``shortcut.py``) next to the weights, for
``diffusers.AutoModel.from_pretrained(path, trust_remote_code=True)`` where ``hf_resdecay`` is not installed.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import BasicTransformerBlock, _chunked_feed_forward
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 (see the model's docstring)
from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel
from diffusers.utils import logging
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

logger = logging.get_logger(__name__)


def _check_latents(hidden_states: torch.Tensor, channels: int, dtype: torch.dtype, patch_size: int) -> None:
    """Raise a ``ValueError`` naming the expected shape or dtype when ``hidden_states`` cannot feed the model.

    Reads shapes and dtypes only, so under ``torch.compile`` the checks are guards, not graph breaks.
    Autocast lets a tensor of another floating dtype through, as the layers then convert it.
    """
    expected = (
        f"(batch, {channels}, height, width) with height and width multiples of patch_size={patch_size}"
    )
    shape = tuple(hidden_states.shape)
    if hidden_states.ndim != 4 or shape[1] != channels or shape[2] % patch_size or shape[3] % patch_size:
        raise ValueError(f"hidden_states must have shape {expected}; got {shape}")
    if shape[0] == 0:
        raise ValueError(f"hidden_states must hold at least one latent, shape {expected}; got {shape}")
    autocast = torch.is_autocast_enabled(hidden_states.device.type)
    if not hidden_states.is_floating_point() or (hidden_states.dtype != dtype and not autocast):
        raise ValueError(
            f"hidden_states must be a floating-point tensor of dtype {dtype} (the model's dtype); got "
            f"{hidden_states.dtype}"
        )


class DiTDecayBlock(BasicTransformerBlock):
    """DiT block (adaLN-Zero, self-attention and MLP) whose residuals read ``x = alpha * x + gate * f``.

    Each addition is one fused ``torch.add(branch, x, alpha=alpha)``; with both coefficients 1 this is
    upstream's ``BasicTransformerBlock`` with ``norm_type="ada_norm_zero"`` exactly.
    """

    attention_alpha: float = 1.0
    mlp_alpha: float = 1.0

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep: torch.LongTensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        class_labels: torch.LongTensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Adapted from `diffusers.models.attention.BasicTransformerBlock.forward` (diffusers 0.42).

        Differs in keeping only the ``norm_type="ada_norm_zero"`` path without cross-attention, GLIGEN or
        positional embedding (what DiT builds), and in the two residual additions, which scale the shortcut
        by ``alpha``.
        """
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(
            hidden_states, timestep, class_labels, hidden_dtype=hidden_states.dtype
        )
        attn_output = self.attn1(normed, attention_mask=attention_mask, **(cross_attention_kwargs or {}))
        attn_output = gate_msa.unsqueeze(1) * attn_output
        hidden_states = torch.add(attn_output, hidden_states, alpha=self.attention_alpha)

        normed = self.norm3(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        if self._chunk_size is not None:
            ff_output = _chunked_feed_forward(self.ff, normed, self._chunk_dim, self._chunk_size)
        else:
            ff_output = self.ff(normed)
        ff_output = gate_mlp.unsqueeze(1) * ff_output
        return torch.add(ff_output, hidden_states, alpha=self.mlp_alpha)

    def extra_repr(self) -> str:
        return f"attention_alpha={self.attention_alpha:.4f}, mlp_alpha={self.mlp_alpha:.4f}"


class DiTDecayTransformer2DModel(DiTTransformer2DModel):
    r"""[`DiTTransformer2DModel`] with decayed shortcuts over the whole stack and U-ViT long skips.

    Sublayer ``k`` of ``2 * num_layers`` (attention, MLP, attention, ...) computes
    ``x = alpha_k * x + gate * f(adaLN(x))``. With ``long_skip_connections``, block ``i`` of the second half
    first adds ``long_skip_projections[j](h)``, ``h`` the output of the mirrored block ``num_layers - 1 - i``
    (with an odd ``num_layers`` the middle block has no skip). ``shortcut_decay=0`` without long skips is
    upstream exactly, same keys.

    A fresh model is initialised as the SiT release initialises (diffusers' own DiT keeps PyTorch's
    default init): every ``Linear`` xavier-uniform with zero bias (query/key/value with the fan of SiT's
    packed ``qkv`` matrix, the long-skip projections included), the patch embedding xavier over its
    flattened kernel, timestep-MLP weights and the label table ``normal(0, 0.02)``, and the adaLN
    modulations and the output head zero (adaLN-Zero). When ``from_pretrained`` retrofits a stock DiT
    checkpoint the missing long-skip projections are zero instead, so the model starts as the stock one
    with decayed shortcuts. diffusers gives every block its own timestep and label embedder where SiT shares
    one; converted SiT weights are copied into each.

    Class labels are never dropped inside the model: diffusers' DiT drops each block's label independently
    (10%, global RNG) in training mode, where SiT drops a sample's label once for the whole stack.
    ``hf_resdecay.sampling.diffusion_loss(label_dropout=0.1)`` does that with the step's generator; the label
    table keeps its null-class row (id ``num_embeds_ada_norm``) for classifier-free guidance.

    Loading a decayed checkpoint into the plain [`DiTTransformer2DModel`] silently drops the decay (and
    the long skips): diffusers only logs unexpected config attributes and unused ``long_skip_projections``
    weights, and the model computes identity shortcuts.

    Saved checkpoints carry ``auto_map`` and the code for ``diffusers.AutoModel.from_pretrained(path,
    trust_remote_code=True)``. A pipeline saved with this transformer records it in ``model_index.json`` as
    ``["hf_resdecay.models.dit_decay", "DiTDecayTransformer2DModel"]``; ``DiffusionPipeline.from_pretrained``
    resolves it only once the caller has imported it (``from hf_resdecay import DiTDecayTransformer2DModel``),
    and then finds the load method through the ``ModelMixin`` name this module imports.

    diffusers' ``AutoModel`` asks for ``trust_remote_code=True`` whenever ``auto_map`` is present, and then
    runs the saved copy of this file even where the package is installed; with the package, load through
    this class's ``from_pretrained``. Without the package, a saved pipeline loads with
    ``trust_remote_code=True`` once its ``model_index.json`` entry reads ``["dit_decay",
    "DiTDecayTransformer2DModel"]`` (the code file in ``transformer/``).

    Args (besides [`DiTTransformer2DModel`]'s):
        shortcut_decay (`float`, *optional*, defaults to 0.2):
            ``1 - alpha_min``, in ``[0, 1)``. 0.2 (``alpha_min`` 0.8) is the paper's SiT/DiT setting.
        shortcut_schedule (`str`, *optional*, defaults to `"linear"`):
            One of ``"linear"`` (the paper), ``"cosine"``, ``"constant"``.
        long_skip_connections (`bool`, *optional*, defaults to `True`):
            U-ViT long skips from the first half of the blocks to the mirrored blocks of the second half.
        timestep_freq_shift (`int`, *optional*, defaults to 1):
            ``downscale_freq_shift`` of the sinusoidal timestep embedding: diffusers' DiT uses 1 (frequencies
            ``exp(-ln(10000) k / (128 - 1))``); SiT and the original DiT code use 0 (``/ 128``).
    """

    _no_split_modules = ["DiTDecayBlock"]  # FSDP wraps each block (training_scripts/configs/fsdp.yaml)

    _auto_class = "AutoModel"  # saved configs get auto_map {"AutoModel": "dit_decay.<this class>"}

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        attention_bias: bool = True,
        sample_size: int = 32,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_zero",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-5,
        shortcut_decay: float = 0.2,
        shortcut_schedule: str = "linear",
        long_skip_connections: bool = True,
        timestep_freq_shift: int = 1,
    ):
        """Build upstream's DiT, then decay its blocks, add the long skips and initialise as SiT does.

        The upstream parameters are spelled out because diffusers reads the config keys from this signature
        (``register_to_config`` records their defaults, ``extract_init_dict`` decides what a saved config may
        set); ``tests/models/test_upstream_signatures.py`` keeps them equal to upstream's.
        """
        validate_shortcut_decay(shortcut_decay)
        if timestep_freq_shift not in (0, 1):
            raise ValueError(
                f"timestep_freq_shift must be 0 (SiT) or 1 (diffusers); got {timestep_freq_shift!r}"
            )
        validate_shortcut_schedule(shortcut_schedule)
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1; got {patch_size!r}")
        if sample_size % patch_size:
            raise ValueError(
                f"sample_size={sample_size} must be a multiple of patch_size={patch_size} (the patch "
                "embedding would crop the remainder silently)"
            )
        super().__init__(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            dropout=dropout,
            norm_num_groups=norm_num_groups,
            attention_bias=attention_bias,
            sample_size=sample_size,
            patch_size=patch_size,
            activation_fn=activation_fn,
            num_embeds_ada_norm=num_embeds_ada_norm,
            upcast_attention=upcast_attention,
            norm_type=norm_type,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps,
        )
        alphas = shortcut_coefficients(2 * num_layers, shortcut_decay, shortcut_schedule)
        for index, block in enumerate(self.transformer_blocks):
            block.__class__ = DiTDecayBlock  # same parameters and keys, decayed forward
            block.attention_alpha, block.mlp_alpha = alphas[2 * index], alphas[2 * index + 1]

        for block in self.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = timestep_freq_shift
            block.norm1.emb.class_embedder.dropout_prob = 0.0  # dropped once per sample by the objective

        self.long_skip_projections = None
        if long_skip_connections:
            self.long_skip_projections = nn.ModuleList(
                nn.Linear(self.inner_dim, self.inner_dim) for _ in range(num_layers // 2)
            )
        self._initialize_as_released()

    @torch.no_grad()
    def _initialize_as_released(self) -> None:
        """SiT's initialisation (see the class docstring); on the meta device it only keeps the shapes.

        Follows ``SiT.initialize_weights`` of the SiT release (itself DiT's ``DiT.initialize_weights``),
        mapped onto diffusers' modules; the split query/key/value projections take the packed-``qkv`` fan.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        patch = self.pos_embed.proj
        nn.init.xavier_uniform_(patch.weight.view(patch.weight.shape[0], -1))
        nn.init.zeros_(patch.bias)
        for block in self.transformer_blocks:
            attention = block.attn1
            bound = math.sqrt(6.0 / (attention.to_q.in_features + 3 * attention.to_q.out_features))
            for projection in (attention.to_q, attention.to_k, attention.to_v):
                nn.init.uniform_(projection.weight, -bound, bound)
            embedder = block.norm1.emb
            nn.init.normal_(embedder.class_embedder.embedding_table.weight, std=0.02)
            for linear in (embedder.timestep_embedder.linear_1, embedder.timestep_embedder.linear_2):
                nn.init.normal_(linear.weight, std=0.02)
            for linear in (block.norm1.linear, self.proj_out_1, self.proj_out_2):
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)

    @property
    def shortcut_coefficients(self) -> list[float]:
        """The shortcut coefficients in use, one per sublayer (attention, MLP, attention, ...)."""
        blocks = self.transformer_blocks
        return [alpha for block in blocks for alpha in (block.attention_alpha, block.mlp_alpha)]

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.LongTensor | None = None,
        class_labels: torch.LongTensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Upstream's forward, with the long skips added in front of the second-half blocks.

        ``hidden_states`` of another shape or dtype than the model takes raises a ``ValueError`` saying which.

        Adapted from `diffusers.models.transformers.dit_transformer_2d.DiTTransformer2DModel.forward`
        (diffusers 0.42). Differs in the input check, the long skips, and the unpatchify, which keeps the
        input's height and width where upstream assumes a square latent.
        """
        _check_latents(
            hidden_states, self.config.in_channels, self.pos_embed.proj.weight.dtype, self.patch_size
        )
        height, width = hidden_states.shape[-2] // self.patch_size, hidden_states.shape[-1] // self.patch_size
        hidden_states = self.pos_embed(hidden_states)
        projections = self.long_skip_projections if self.long_skip_projections is not None else ()
        first_decoder_block = len(self.transformer_blocks) - len(projections)
        skips = []
        for index, block in enumerate(self.transformer_blocks):
            if index >= first_decoder_block:
                hidden_states = hidden_states + projections[index - first_decoder_block](skips.pop())
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, None, None, None, timestep, cross_attention_kwargs, class_labels
                )
            else:
                hidden_states = block(
                    hidden_states,
                    timestep=timestep,
                    cross_attention_kwargs=cross_attention_kwargs,
                    class_labels=class_labels,
                )
            if index < len(projections):
                skips.append(hidden_states)

        # upstream's final adaLN layer and unpatchify
        conditioning = self.transformer_blocks[0].norm1.emb(
            timestep, class_labels, hidden_dtype=hidden_states.dtype
        )
        shift, scale = self.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        hidden_states = self.norm_out(hidden_states) * (1 + scale[:, None]) + shift[:, None]
        hidden_states = self.proj_out_2(hidden_states)
        hidden_states = hidden_states.reshape(
            shape=(-1, height, width, self.patch_size, self.patch_size, self.out_channels)
        )
        hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
        output = hidden_states.reshape(
            shape=(-1, self.out_channels, height * self.patch_size, width * self.patch_size)
        )
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)

    @classmethod
    def extract_init_dict(cls, config_dict: dict, **kwargs) -> tuple[dict, dict, dict]:
        """As diffusers does, minus the ``auto_map`` entry (code metadata, not an ``__init__`` argument)."""
        config_dict = {key: value for key, value in config_dict.items() if key != "auto_map"}
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs
    ) -> DiTDecayTransformer2DModel | tuple[DiTDecayTransformer2DModel, dict]:
        """Load as diffusers does; zero the long-skip projections a stock checkpoint lacks, and say so.

        diffusers builds the model without initialising it (and on the meta device by default), so
        projections missing from the checkpoint are created here as zeros, on the weights' device and dtype.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, output_loading_info=True, **kwargs
        )
        missing = loading_info["missing_keys"]
        new = sorted(name for name in missing if name.startswith("long_skip_projections."))
        if new:
            reference = model.proj_out_2.weight
            for name in new:
                module_name, _, tensor_name = name.rpartition(".")
                module = model.get_submodule(module_name)
                shape = getattr(module, tensor_name).shape
                zeros = torch.zeros(shape, dtype=reference.dtype, device=reference.device)
                setattr(module, tensor_name, nn.Parameter(zeros, requires_grad=reference.requires_grad))
            logger.warning(
                f"Retrofitted {pretrained_model_name_or_path} into {cls.__name__} with "
                f"shortcut_decay={model.config.shortcut_decay} ({model.config.shortcut_schedule} schedule). "
                f"Zero-initialised long-skip tensors ({len(new)}): {', '.join(new)}."
            )
        return (model, loading_info) if output_loading_info else model

    def save_pretrained(
        self, save_directory: str | os.PathLike, is_main_process: bool = True, **kwargs
    ) -> None:
        """Save as diffusers does, plus this file and ``shortcut.py`` for ``trust_remote_code``."""
        if is_main_process:  # copied first: with push_to_hub=True diffusers uploads the folder as it saves
            ship_code_files(save_directory, __name__)
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)


__all__ = ["DiTDecayBlock", "DiTDecayTransformer2DModel"]
