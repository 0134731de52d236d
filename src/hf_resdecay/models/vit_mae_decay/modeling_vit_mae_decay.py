"""ViTMAE with decayed identity shortcuts (arXiv 2404.10947), built on transformers' ViTMAE classes.

Only what the recipe changes is redefined here: the encoder layer's two residual additions, the optional
final encoder LayerNorm, the encoder-to-decoder skip layers, zero initialisation, and the save hook that
ships this code with every checkpoint. Everything else is transformers' own ViTMAE.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn
from transformers import initialization as init
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import PreTrainedModel
from transformers.models.vit_mae.modeling_vit_mae import (
    ViTMAEAttention,
    ViTMAEDecoder,
    ViTMAEDecoderOutput,
    ViTMAEEmbeddings,
    ViTMAEForPreTraining,
    ViTMAEForPreTrainingOutput,
    ViTMAELayer,
    ViTMAEModel,
    ViTMAEModelOutput,
    ViTMAEPreTrainedModel,
    build_2d_sinusoidal_position_embedding,
)
from transformers.utils import logging
from transformers.utils.output_capturing import maybe_install_capturing_hooks

from .configuration_vit_mae_decay import ViTMAEDecayConfig

try:
    from hf_resdecay.shortcut import ship_code_files, shortcut_coefficients
except ImportError:  # loaded with trust_remote_code=True, next to a copy of shortcut.py
    from .shortcut import ship_code_files, shortcut_coefficients

logger = logging.get_logger(__name__)

REMOTE_CODE_AUTO_MAP = {
    "AutoConfig": "configuration_vit_mae_decay.ViTMAEDecayConfig",
    "AutoModel": "modeling_vit_mae_decay.ViTMAEDecayModel",
    "AutoModelForPreTraining": "modeling_vit_mae_decay.ViTMAEDecayForPreTraining",
}
"""``auto_map`` written into every saved config, so ``trust_remote_code=True`` finds the classes."""


def _register_checkpoint_key_renaming() -> None:
    """Give the decayed classes the key renaming of their upstream twins.

    Checkpoints written by transformers keep the legacy ViTMAE key names on disk
    (``attention.attention.query``, ``encoder.layer.N``); upstream renames them on load and back on save,
    by class name. Registering our classes makes stock checkpoints load into them and ours into stock ViTMAE.
    """
    for ours, upstream in (
        ("ViTMAEDecayModel", "ViTMAEModel"),
        ("ViTMAEDecayForPreTraining", "ViTMAEForPreTraining"),
    ):
        mapping = get_checkpoint_conversion_mapping(upstream)
        if mapping is not None:
            register_checkpoint_conversion_mapping(ours, mapping, overwrite=True)


_register_checkpoint_key_renaming()


def _sincos_position_embedding(num_patches: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table with a CLS row, in the half order that MAE's published weights use.

    Adapted from the table built in
    `transformers.models.vit_mae.modeling_vit_mae.ViTMAEEmbeddings.initialize_weights` and
    `...ViTMAEDecoder.initialize_weights` (transformers 5.24); here it is returned, not copied in.
    """
    grid_size = int(num_patches**0.5)
    table = build_2d_sinusoidal_position_embedding(
        height=grid_size, width=grid_size, embed_dim=dim, cls_token=True
    )
    half = table.shape[-1] // 2
    return torch.cat([table[..., half:], table[..., :half]], dim=-1).unsqueeze(0)


def _restore_token_order(
    tokens: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor
) -> torch.Tensor:
    """Fill the masked positions of ``[CLS, kept patches]`` with ``mask_token`` and undo the shuffle.

    Adapted from the unshuffle in `transformers.models.vit_mae.modeling_vit_mae.ViTMAEDecoder.forward`
    (transformers 5.24); the mask token is an argument, so each skip layer can bring its own.
    """
    batch_size, num_kept, dim = tokens.shape
    fill = mask_token.expand(batch_size, ids_restore.shape[1] + 1 - num_kept, dim)
    patches = torch.cat([tokens[:, 1:, :], fill], dim=1)
    index = ids_restore.to(patches.device).unsqueeze(-1).expand(-1, -1, dim)
    patches = torch.gather(patches, dim=1, index=index)
    return torch.cat([tokens[:, :1, :], patches], dim=1)


class ViTMAEDecayLayer(ViTMAELayer):
    """Pre-LN ViT block whose two residual additions scale the shortcut: ``x = alpha * x + f(LN(x))``.

    Each addition is one fused ``torch.add(branch, x, alpha=alpha)``, so the decay costs nothing; with
    both coefficients 1 it is exactly upstream's ``branch + x``. The parameters are upstream's, so
    :meth:`decay_` can turn an upstream layer into this class in place.
    """

    attention_alpha: float = 1.0
    mlp_alpha: float = 1.0

    def __init__(self, config: ViTMAEDecayConfig, attention_alpha: float = 1.0, mlp_alpha: float = 1.0):
        super().__init__(config)
        self.attention_alpha = float(attention_alpha)
        self.mlp_alpha = float(mlp_alpha)

    @classmethod
    def decay_(cls, layer: ViTMAELayer, attention_alpha: float, mlp_alpha: float) -> ViTMAEDecayLayer:
        """Switch an upstream ``ViTMAELayer`` to this class in place, keeping its (initialised) parameters."""
        layer.__class__ = cls
        layer.attention_alpha = float(attention_alpha)
        layer.mlp_alpha = float(mlp_alpha)
        return layer

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """Adapted from `transformers.models.vit_mae.modeling_vit_mae.ViTMAELayer.forward`
        (transformers 5.24); differs only in the residual additions, which scale the shortcut by ``alpha``.
        """
        branch, _ = self.attention(self.layernorm_before(hidden_states), attention_mask, **kwargs)
        hidden_states = torch.add(self.dropout(branch), hidden_states, alpha=self.attention_alpha)
        branch = self.mlp(self.layernorm_after(hidden_states))
        return torch.add(self.dropout(branch), hidden_states, alpha=self.mlp_alpha)

    def extra_repr(self) -> str:
        return f"attention_alpha={self.attention_alpha:.4f}, mlp_alpha={self.mlp_alpha:.4f}"


class ViTMAEDecaySkipLayer(GradientCheckpointingLayer):
    """One encoder-to-decoder skip: ``x_dec += MLP(concat[skip, x_dec])``, the skip first as released.

    The skip (an encoder block's output on the kept tokens) gets its masked positions filled with this
    layer's own learned mask token and is put back in patch order first. The MLP's last weight starts at
    zero, so a fresh skip adds nothing. Like the blocks, it recomputes its activations in the backward pass
    when activation checkpointing is on (its input is decoder width plus encoder width, the widest there).
    """

    def __init__(self, encoder_size: int, decoder_size: int):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder_size))
        self.proj_in = nn.Linear(encoder_size + decoder_size, decoder_size)
        self.act = nn.SiLU()
        self.proj_out = nn.Linear(decoder_size, decoder_size)

    def forward(
        self, hidden_states: torch.Tensor, skip: torch.Tensor, ids_restore: torch.Tensor
    ) -> torch.Tensor:
        skip = _restore_token_order(skip, self.mask_token, ids_restore)
        return hidden_states + self.proj_out(self.act(self.proj_in(torch.cat([skip, hidden_states], dim=-1))))


class ViTMAEDecayDecoder(ViTMAEDecoder):
    """Upstream MAE decoder (its blocks keep ``alpha = 1``) plus the optional encoder skips.

    With skips the decoder input is the release's: ``decoder_embed(concat[decoder_cls_token,
    decoder_pos_embed[1:]])``, one token per position, where the CLS token has the decoder width and
    ``decoder_embed`` maps decoder width to decoder width; no position embedding is added afterwards.
    Encoder information enters only through the skips, and the upstream ``mask_token`` is not used (so it
    is not created).
    """

    def __init__(self, config: ViTMAEDecayConfig, num_patches: int):
        super().__init__(config, num_patches)
        num_skips = config.num_decoder_skip_connections
        self.skip_layers = nn.ModuleList(
            ViTMAEDecaySkipLayer(config.hidden_size, config.decoder_hidden_size) for _ in range(num_skips)
        )
        if num_skips:
            del self.mask_token
            width = config.decoder_hidden_size
            self.decoder_embed = nn.Linear(width, width, bias=True)
            self.decoder_cls_token = nn.Parameter(torch.zeros(1, 1, width))

    def forward(
        self,
        hidden_states: torch.Tensor,
        ids_restore: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        skip_hidden_states: tuple[torch.Tensor, ...] | None = None,
    ) -> ViTMAEDecoderOutput:
        """``skip_hidden_states[i]`` feeds decoder block ``i``; ignored when the config has no skips.

        Adapted from `transformers.models.vit_mae.modeling_vit_mae.ViTMAEDecoder.forward` (transformers 5.24),
        which runs unchanged without skips. With skips the input is the learned CLS token and the positions
        (not the encoder latent), and skip layer ``i`` runs before decoder block ``i``.
        """
        if len(self.skip_layers) == 0:
            return super().forward(
                hidden_states, ids_restore, interpolate_pos_encoding=interpolate_pos_encoding
            )
        if skip_hidden_states is None or len(skip_hidden_states) != len(self.skip_layers):
            raise ValueError(
                f"skip_hidden_states must hold {len(self.skip_layers)} encoder block outputs; got "
                f"{None if skip_hidden_states is None else len(skip_hidden_states)}"
            )
        positions = self.decoder_pos_embed
        if interpolate_pos_encoding:  # upstream's interpolation reads only the sequence length
            positions = self.interpolate_pos_encoding(positions.new_empty(1, ids_restore.shape[1] + 1, 0))
        tokens = torch.cat([self.decoder_cls_token, positions[:, 1:]], dim=1)
        hidden_states = self.decoder_embed(tokens).expand(hidden_states.shape[0], -1, -1)
        for index, layer_module in enumerate(self.decoder_layers):
            if index < len(self.skip_layers):
                hidden_states = self.skip_layers[index](hidden_states, skip_hidden_states[index], ids_restore)
            hidden_states = layer_module(hidden_states)
        logits = self.decoder_pred(self.decoder_norm(hidden_states))
        return ViTMAEDecoderOutput(logits=logits[:, 1:, :])


class ViTMAEDecayPreTrainedModel(ViTMAEPreTrainedModel):
    """Shared behaviour of the decayed ViTMAE classes: config, initialisation, saving with remote code."""

    config_class = ViTMAEDecayConfig
    config: ViTMAEDecayConfig
    _no_split_modules = ["ViTMAEEmbeddings", "ViTMAELayer", "ViTMAEDecayLayer", "ViTMAEDecayDecoder"]

    @property
    def shortcut_coefficients(self) -> list[float]:
        """The encoder's shortcut coefficients in use, one per sublayer (attention, MLP, attention, ...)."""
        layers = self.base_model.layers
        return [alpha for layer in layers for alpha in (layer.attention_alpha, layer.mlp_alpha)]

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        """Initialise like built-in models do, parameter-free containers (the layers) included.

        transformers skips modules without direct parameters for code outside its own package, in case
        that code writes weights in place; ours uses the guarded ``transformers.initialization`` functions,
        which leave loaded tensors alone, and zero-initialises projections from the layer that owns them.
        """
        super()._initialize_weights(module, is_custom_code=False)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The configured initialisation plus the recipe's zero init; tensors already loaded are left alone.

        Children are initialised before their parents, so a parent (the attention, a layer, the decoder)
        can redraw what its children drew: the packed-``qkv`` fan, the zeroed branch outputs.

        Adapted from `transformers.models.vit_mae.modeling_vit_mae.ViTMAEPreTrainedModel._init_weights`,
        `...ViTMAEEmbeddings.initialize_weights` and `...ViTMAEDecoder.initialize_weights`
        (transformers 5.24). Differs in the xavier ``"mae"`` initializer with the packed-``qkv`` fan; in
        drawing the sin-cos positions, the xavier patch embedding and the ``normal`` CLS and mask tokens
        per tensor, where upstream's initialisation flags leave them at zero or at the generic ``normal``
        init; and in the recipe's zero init and skip layers.
        """
        config = self.config
        released = config.initializer == "mae"
        if released and isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        else:
            PreTrainedModel._init_weights(self, module)
        zero_init = config.zero_init_residual_branches
        if isinstance(module, ViTMAEEmbeddings):
            table = _sincos_position_embedding(
                module.patch_embeddings.num_patches, module.position_embeddings.shape[-1]
            )
            init.copy_(module.position_embeddings, table)
            weight = module.patch_embeddings.projection.weight
            if not getattr(weight, "_is_hf_initialized", False):  # a view below would lose the flag
                init.xavier_uniform_(weight.view(weight.shape[0], -1))
            init.normal_(module.cls_token, std=config.initializer_range)
        elif isinstance(module, ViTMAEAttention) and released:
            # MAE packs query, key and value into one (3 * width, width) Linear: xavier over that matrix.
            width = module.q_proj.in_features
            bound = math.sqrt(6.0 / (width + 3 * module.q_proj.out_features))
            for projection in (module.q_proj, module.k_proj, module.v_proj):
                init.uniform_(projection.weight, -bound, bound)
        elif isinstance(module, ViTMAEDecoder):
            num_patches = module.decoder_pos_embed.shape[1] - 1
            init.copy_(
                module.decoder_pos_embed,
                _sincos_position_embedding(num_patches, module.decoder_pos_embed.shape[-1]),
            )
            for name in ("mask_token", "decoder_cls_token"):
                if hasattr(module, name):
                    init.normal_(getattr(module, name), std=config.initializer_range)
            if zero_init:
                init.zeros_(module.decoder_pred.weight)
                init.zeros_(module.decoder_pred.bias)
        elif isinstance(module, ViTMAELayer) and zero_init:
            for projection in (module.attention.o_proj, module.mlp.fc2):
                init.zeros_(projection.weight)
                init.zeros_(projection.bias)
        elif isinstance(module, ViTMAEDecaySkipLayer):
            init.normal_(module.mask_token, std=config.initializer_range)
            init.zeros_(module.proj_out.weight)
            init.zeros_(module.proj_out.bias)

    def _check_pixel_values(
        self, pixel_values: torch.Tensor | None, interpolate_pos_encoding: bool | None
    ) -> None:
        """Raise a ``ValueError`` naming the expected shape or dtype when ``pixel_values`` cannot feed us.

        Only shapes and dtypes are read (no tensor values), so under ``torch.compile`` these checks become
        guards, not graph breaks.
        """
        if pixel_values is None:
            raise ValueError(
                "pixel_values is required: a float tensor of shape (batch, channels, height, width)"
            )
        config = self.config
        size = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
        patch = (
            config.patch_size if isinstance(config.patch_size, (list, tuple)) else (config.patch_size,) * 2
        )
        expected = f"(batch, {config.num_channels}, {size[0]}, {size[1]})"
        shape = tuple(pixel_values.shape)
        if pixel_values.ndim != 4 or shape[1] != config.num_channels:
            raise ValueError(
                f"pixel_values must have shape {expected} (num_channels={config.num_channels}); got {shape}"
            )
        if shape[0] == 0:
            raise ValueError(f"pixel_values must hold at least one image, shape {expected}; got {shape}")
        weight_dtype = self.base_model.embeddings.patch_embeddings.projection.weight.dtype
        autocast = torch.is_autocast_enabled(pixel_values.device.type)
        if not pixel_values.is_floating_point() or (pixel_values.dtype != weight_dtype and not autocast):
            raise ValueError(
                f"pixel_values must be a floating-point tensor of dtype {weight_dtype} (the model's dtype); "
                f"got {pixel_values.dtype}. Normalise the images as the image processor does and convert "
                f"them with .to({weight_dtype})."
            )
        if interpolate_pos_encoding:
            if shape[2] % patch[0] or shape[3] % patch[1]:
                raise ValueError(
                    f"pixel_values height and width must be multiples of patch_size={config.patch_size} "
                    f"with interpolate_pos_encoding=True; got {shape}"
                )
        elif shape[2:] != tuple(size):
            raise ValueError(
                f"pixel_values must have shape {expected} (image_size={config.image_size}); got {shape}. "
                "Resize the images (the checkpoint's image processor does) "
                "or pass interpolate_pos_encoding=True."
            )

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Save as transformers does, plus ``auto_map`` and the three code files for ``trust_remote_code``."""
        self.config.auto_map = dict(REMOTE_CODE_AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            ship_code_files(save_directory, ViTMAEDecayConfig.__module__, __name__)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load as transformers does; when a stock ViTMAE checkpoint is retrofitted, summarise what changed.

        ``ViTMAEDecayForPreTraining.from_pretrained("facebook/vit-mae-base", shortcut_decay=0.3)`` keeps every
        encoder and decoder-block weight, starts the skip layers and the decoder input (CLS token and
        ``decoder_embed``, whose role differs from upstream's) fresh, and drops the tensors the recipe has no
        use for (the final encoder LayerNorm, the upstream decoder mask token). Any other size mismatch
        raises, as in transformers, unless ``ignore_mismatched_sizes=True``.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path,
            *model_args,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            **kwargs,
        )
        retrofit = any(_is_recipe_parameter(name) for name in loading_info.get("missing_keys", ()))
        mismatched = {entry[0] for entry in loading_info.get("mismatched_keys", ())}
        unexpected_mismatches = mismatched - (set(_DECODER_INPUT_KEYS) if retrofit else set())
        if unexpected_mismatches and not ignore_mismatched_sizes:
            raise RuntimeError(
                f"{pretrained_model_name_or_path}: checkpoint tensors do not fit "
                f"{cls.__name__}({model.config.to_diff_dict()}): {', '.join(sorted(unexpected_mismatches))}. "
                "Pass ignore_mismatched_sizes=True to initialise them afresh."
            )
        if retrofit:
            model._restart_decoder_input(mismatched)
        _report_retrofit(model, pretrained_model_name_or_path, loading_info)
        return (model, loading_info) if output_loading_info else model

    def _restart_decoder_input(self, already_fresh: set[str]) -> None:
        """Redraw a ``decoder_embed`` loaded from a checkpoint without skips (there it read the latent)."""
        decoder = getattr(self, "decoder", None)
        if decoder is None or all(key in already_fresh for key in _DECODER_INPUT_KEYS):
            return
        for parameter in decoder.decoder_embed.parameters():
            parameter._is_hf_initialized = False
        self._init_weights(decoder.decoder_embed)


_DECODER_INPUT_KEYS = ("decoder.decoder_embed.weight", "decoder.decoder_embed.bias")
"""With skips, ``decoder_embed`` maps the decoder CLS token and positions; a stock one maps the latent."""


def _is_recipe_parameter(name: str) -> bool:
    """Whether a parameter belongs to the encoder skips, which stock ViTMAE checkpoints do not have."""
    return "skip_layers." in name or name.endswith("decoder_cls_token")


def _report_retrofit(
    model: ViTMAEDecayPreTrainedModel, source: str | os.PathLike, loading_info: dict
) -> None:
    """Summarise a retrofit (a checkpoint without the skip layers loaded into the recipe) in one warning."""
    new = sorted(name for name in loading_info.get("missing_keys", ()) if _is_recipe_parameter(name))
    if not new:
        return
    new = sorted({*new, *_DECODER_INPUT_KEYS})
    unused = sorted(loading_info.get("unexpected_keys", ()))
    logger.warning(
        f"Retrofitted {source} into {type(model).__name__} with shortcut_decay={model.config.shortcut_decay} "
        f"({model.config.shortcut_schedule} schedule). Freshly initialised decoder-input and skip-layer "
        f"tensors ({len(new)}): {', '.join(new)}. Checkpoint tensors the recipe does not use "
        f"({len(unused)}): {', '.join(unused) or 'none'}."
    )


class ViTMAEDecayModel(ViTMAEDecayPreTrainedModel, ViTMAEModel):
    """ViTMAE encoder with decayed shortcuts; upstream ``ViTMAEModel.forward`` runs unchanged on it."""

    def __init__(self, config: ViTMAEDecayConfig):
        """Upstream's encoder with its layers switched to the decayed class (and, unless
        ``encoder_final_layernorm``, its final LayerNorm replaced by an identity).

        Upstream's ``post_init`` already initialises every weight with this class's ``_init_weights``, and
        the switch keeps the parameters, so the weights (and the random draws) are those of a model built
        directly from decayed parts; nothing is initialised twice.
        """
        super().__init__(config)
        alphas = shortcut_coefficients(
            2 * config.num_hidden_layers, config.shortcut_decay, config.shortcut_schedule
        )
        for index, layer in enumerate(self.layers):
            ViTMAEDecayLayer.decay_(layer, alphas[2 * index], alphas[2 * index + 1])
        if not config.encoder_final_layernorm:
            self.layernorm = nn.Identity()
        # transformers installs the hooks that collect hidden states on first use, under a lock that
        # torch.compile cannot trace; installing them now keeps a compiled forward in one graph.
        maybe_install_capturing_hooks(self)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> ViTMAEModelOutput:
        """Upstream forward after a clear check of ``pixel_values``; see ``ViTMAEModel.forward``."""
        self._check_pixel_values(pixel_values, interpolate_pos_encoding)
        return super().forward(
            pixel_values,
            noise=noise,
            interpolate_pos_encoding=interpolate_pos_encoding,
            attention_mask=attention_mask,
            **kwargs,
        )


class ViTMAEDecayForPreTraining(ViTMAEDecayPreTrainedModel, ViTMAEForPreTraining):
    """Decayed MAE for pretraining: decayed encoder, upstream decoder blocks, optional encoder skips."""

    def __init__(self, config: ViTMAEDecayConfig):
        """Upstream's model with its encoder and decoder replaced by the decayed ones.

        Both upstream parts are replaced whole, so they are built on the meta device: no memory, no
        initialisation and no random draws, which leaves the seeded weights those of the decayed parts.
        """
        with torch.device("meta"):
            super().__init__(config)
        self.vit = ViTMAEDecayModel(config)
        self.decoder = ViTMAEDecayDecoder(
            config, num_patches=self.vit.embeddings.patch_embeddings.num_patches
        )
        # upstream's post_init recorded its own children's block names (ViTMAEDecoder): FSDP's wrap policy
        # and device maps must see ours only, so post_init collects them again from the parts in place
        self._no_split_modules = type(self)._no_split_modules
        self.post_init()

    def _skip_sources(self) -> list[int]:
        """Encoder blocks feeding decoder blocks 0, 1, ...: the last block, then every second one back."""
        last = self.config.num_hidden_layers - 1
        return [last - 2 * i for i in range(self.config.num_decoder_skip_connections)]

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> ViTMAEForPreTrainingOutput:
        """Masked reconstruction loss as upstream; the decoder also receives the encoder skips.

        ``noise`` of shape ``(batch, num_patches)`` fixes the masking, as upstream.

        Adapted from `transformers.models.vit_mae.modeling_vit_mae.ViTMAEForPreTraining.forward`
        (transformers 5.24). Differs in asking the encoder for its hidden states when there are skips and
        passing the chosen ones to the decoder, returning hidden states only when asked, and computing the
        loss in :meth:`forward_loss`.
        """
        return_hidden_states = kwargs.pop("output_hidden_states", self.config.output_hidden_states)
        skip_sources = self._skip_sources()
        outputs: ViTMAEModelOutput = self.vit(
            pixel_values,
            noise=noise,
            interpolate_pos_encoding=interpolate_pos_encoding,
            attention_mask=attention_mask,
            output_hidden_states=True if skip_sources else return_hidden_states,
            **kwargs,
        )
        skips = tuple(outputs.hidden_states[index + 1] for index in skip_sources) if skip_sources else None
        decoder_outputs = self.decoder(
            outputs.last_hidden_state,
            outputs.ids_restore,
            interpolate_pos_encoding=bool(interpolate_pos_encoding),
            skip_hidden_states=skips,
        )
        logits = decoder_outputs.logits
        loss = self.forward_loss(
            pixel_values, logits, outputs.mask, interpolate_pos_encoding=interpolate_pos_encoding
        )
        return ViTMAEForPreTrainingOutput(
            loss=loss,
            logits=logits,
            mask=outputs.mask,
            ids_restore=outputs.ids_restore,
            hidden_states=outputs.hidden_states if return_hidden_states else None,
            attentions=outputs.attentions,
        )

    def forward_loss(
        self,
        pixel_values: torch.Tensor,
        logits: torch.Tensor,
        mask: torch.Tensor,
        interpolate_pos_encoding: bool | None = False,
    ) -> torch.Tensor:
        """Mean squared error on the masked patches (per-patch normalised targets with ``norm_pix_loss``).

        Adapted from the loss lines of
        `transformers.models.vit_mae.modeling_vit_mae.ViTMAEForPreTraining.forward` (transformers 5.24,
        which has no ``forward_loss`` method): the same arithmetic, as a method of its own.
        """
        target = self.patchify(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((logits - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()


__all__ = [
    "ViTMAEDecayDecoder",
    "ViTMAEDecayForPreTraining",
    "ViTMAEDecayLayer",
    "ViTMAEDecayModel",
    "ViTMAEDecayPreTrainedModel",
    "ViTMAEDecaySkipLayer",
]
