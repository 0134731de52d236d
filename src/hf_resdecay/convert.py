"""Convert released PyTorch checkpoints into ``save_pretrained`` folders of the package's models.

Three source formats:

- ``"decay-mae"``: the decayed MAE of the authors' release (arXiv 2404.10947), a ``checkpoint-*.pth`` with
  ``model`` and the training ``args``; becomes a [`ViTMAEDecayForPreTraining`] with the full recipe.
- ``"mae"``: facebookresearch/mae checkpoints, encoder only (``mae_pretrain_vit_*.pth``) or with the
  decoder (``mae_visualize_vit_*.pth``); becomes the plain model (equal to upstream ViTMAE), or a retrofit
  with decayed encoder shortcuts (``shortcut_decay > 0``), optionally with the rest of the recipe.
- ``"sit"``: the release's SiT (a DiT trained with flow matching, decayed shortcuts, U-ViT long skips);
  becomes a [`DiTDecayTransformer2DModel`] whose output equals the release's ``forward``.

Checkpoints are read with ``torch.load(weights_only=True)``, with ``argparse.Namespace`` (the training
arguments the release scripts save) the only class allowed besides tensors and plain containers, so a
checkpoint cannot run code. Every target tensor is either mapped from the checkpoint or reported as fresh,
and every checkpoint tensor is either mapped or reported as dropped with its reason; anything else is an
error. See :class:`ConversionReport`.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .models import DiTDecayTransformer2DModel, ViTMAEDecayForPreTraining, ViTMAEDecayModel

FORMATS: tuple[str, ...] = ("decay-mae", "mae", "sit")
"""Source formats understood by :func:`convert_checkpoint`."""

VIT_ENCODER_HEADS: dict[int, int] = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
"""Attention heads of the standard ViT widths (Ti, S, B, L, H): head size 64, 80 for ViT-H."""

MAE_DECODER_HEADS = 16
"""Attention heads of every MAE decoder in facebookresearch/mae and the decayed release."""

SIT_HEADS: dict[int, int] = {384: 6, 768: 12, 1024: 16, 1152: 16}
"""Attention heads of the SiT/DiT widths (S, B, L, XL)."""

SIT_FREQUENCY_CHANNELS = 256
"""Size of the sinusoidal timestep embedding, in SiT and in diffusers' DiT alike."""

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ConversionReport:
    """What a conversion did with every tensor, for the user to check before trusting the result.

    ``mapped``: target key -> the source key it came from (a slice is named, e.g. ``attn.qkv.weight[q]``).
    ``dropped``: source key -> why the converted model does not use it.
    ``fresh``: target key -> why it has no source and keeps the model's initialisation.
    ``verified``: source key -> the value the target computes itself, checked equal instead of copied.
    ``settings``: the architecture and recipe values chosen, ``notes``: where each came from.
    """

    format: str
    model_class: str = ""
    mapped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    fresh: dict[str, str] = field(default_factory=dict)
    verified: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def num_source_tensors_used(self) -> int:
        """How many distinct source tensors feed the converted model."""
        return len({re.sub(r"\[.*\]$", "", source) for source in self.mapped.values()})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as written to ``conversion.json`` next to the weights."""
        return asdict(self)

    def summary(self) -> str:
        """A few lines for a terminal: counts, then dropped and fresh tensors grouped by reason.

        Long groups are cut after eight names; ``to_dict`` (``conversion.json``) has every one.
        """
        lines = [
            f"{self.format} -> {self.model_class}: {len(self.mapped)} target tensors mapped from "
            f"{self.num_source_tensors_used} source tensors"
        ]
        for title, entries in (
            ("dropped source", self.dropped),
            ("fresh target", self.fresh),
            ("verified, not stored", self.verified),
        ):
            if not entries and title.startswith("verified"):
                continue
            lines.append(f"{title} tensors: {len(entries)}")
            by_reason: dict[str, list[str]] = {}
            for key, reason in entries.items():
                by_reason.setdefault(reason, []).append(key)
            for reason, keys in by_reason.items():
                shown = ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
                lines.append(f"  {shown}: {reason}")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint without running code; return its state dict and its training arguments.

    ``.safetensors`` files are read as they are; anything else with ``torch.load(weights_only=True)``,
    allowing ``argparse.Namespace`` and no other class. The state dict is taken from ``ema`` (preferred, as
    SiT samples with the EMA weights), ``model`` or ``state_dict``, or the file itself when it maps names to
    tensors; a ``module.`` prefix (DistributedDataParallel) is removed. The arguments are the ``args`` entry
    as a dict, empty when there is none.
    """
    state_dict, arguments, _ = _read_checkpoint(Path(path))
    return state_dict, arguments


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """:func:`load_checkpoint`, plus which entry of the file the weights came from."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _strip_prefix(load_file(path), path), {}, "the whole file"
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"refusing to load {path}: it pickles an object other than tensors, plain containers and "
            f"argparse.Namespace, and unpickling it could run code. torch said: {str(error).strip()[-400:]}"
        ) from error
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}; expected a dict of tensors")
    arguments = checkpoint.get("args")
    if isinstance(arguments, argparse.Namespace):
        arguments = vars(arguments)
    arguments = dict(arguments) if isinstance(arguments, Mapping) else {}
    for name in ("ema", "model", "state_dict"):
        if isinstance(checkpoint.get(name), Mapping):
            return _strip_prefix(checkpoint[name], path), arguments, f"the {name!r} entry"
    if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        return _strip_prefix(checkpoint, path), {}, "the whole file"
    raise ValueError(
        f"{path} has no state dict: expected an 'ema', 'model' or 'state_dict' entry or a plain mapping of "
        f"names to tensors; its top-level keys are {sorted(map(str, checkpoint))}"
    )


def _strip_prefix(state_dict: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """Check every value is a tensor and drop the ``module.`` prefix that DDP adds to every key."""
    not_tensors = sorted(key for key, value in state_dict.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise ValueError(f"the state dict in {path} has non-tensor entries: {not_tensors[:10]}")
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key[len("module.") :]: value for key, value in state_dict.items()}
    return dict(state_dict)


class _Mapper:
    """Moves tensors from a source state dict to target keys and records every decision in a report."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], report: ConversionReport):
        self.source = dict(state_dict)
        self.report = report
        self.target: dict[str, torch.Tensor] = {}
        self.used: set[str] = set()

    def take(self, key: str) -> torch.Tensor:
        """The source tensor ``key``, marked as used; a clear error when the checkpoint lacks it."""
        if key not in self.source:
            raise ValueError(
                f"the {self.report.format} checkpoint lacks {key!r}, which its layout requires{_hint(self)}"
            )
        self.used.add(key)
        return self.source[key]

    def put(self, target: str, tensor: torch.Tensor, source: str) -> None:
        self.target[target] = tensor
        self.report.mapped[target] = source

    def copy(self, source: str, target: str) -> None:
        self.put(target, self.take(source), source)

    def copy_linear(self, source: str, target: str) -> None:
        """Copy ``weight`` and ``bias`` of a Linear (or Conv2d, LayerNorm) module."""
        for name in ("weight", "bias"):
            self.copy(f"{source}.{name}", f"{target}.{name}")

    def split_qkv(self, source: str, targets: tuple[str, str, str], width: int) -> None:
        """Split a packed ``[q; k; v]`` projection (rows in that order) into three Linears."""
        for name in ("weight", "bias"):
            key = f"{source}.{name}"
            packed = self.take(key)
            if packed.shape[0] != 3 * width:
                raise ValueError(
                    f"{key} has shape {tuple(packed.shape)}; a packed [q; k; v] projection of width {width} "
                    f"has {3 * width} rows"
                )
            for letter, target, part in zip("qkv", targets, packed.chunk(3, dim=0), strict=True):
                self.put(f"{target}.{name}", part.clone(), f"{key}[{letter}]")

    def drop(self, key: str, reason: str) -> None:
        self.used.add(key)
        self.report.dropped[key] = reason

    def drop_prefix(self, prefix: str, reason: str) -> None:
        for key in sorted(self.source):
            if key.startswith(prefix):
                self.drop(key, reason)

    def check_all_used(self) -> None:
        """Every source tensor must be mapped or dropped: an unknown one means an unexpected layout."""
        unknown = sorted(set(self.source) - self.used)
        if unknown:
            shown = ", ".join(unknown[:12]) + (f" (+{len(unknown) - 12} more)" if len(unknown) > 12 else "")
            raise ValueError(
                f"the checkpoint has tensors a {self.report.format} checkpoint does not: {shown}{_hint(self)}"
            )


def _guess_format(keys: set[str]) -> str | None:
    """The source format whose signature keys ``keys`` carry, to point at a wrong ``--format``."""
    if any(key.startswith("enc_blocks.") for key in keys):
        return "sit"
    if any(key.startswith("skip.") for key in keys):
        return "decay-mae"
    if any(key.startswith("blocks.") for key in keys):
        return "mae"
    return None


def _hint(mapper: _Mapper) -> str:
    guess = _guess_format(set(mapper.source))
    if guess is None or guess == mapper.report.format:
        return ""
    return f" (its keys look like a {guess!r} checkpoint: try format={guess!r})"


def _block_count(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many ``{prefix}.N.`` blocks there are; an error unless they are numbered 0 .. n-1."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    indices = {int(match.group(1)) for key in state_dict if (match := pattern.match(key))}
    if indices != set(range(len(indices))):
        raise ValueError(f"{prefix}.N blocks must be numbered 0 .. n-1; found {sorted(indices)}")
    return len(indices)


def _require(state_dict: Mapping[str, torch.Tensor], key: str, format: str, ndim: int) -> torch.Tensor:
    """A tensor the architecture is read from, with the expected number of dimensions."""
    if key not in state_dict:
        guess = _guess_format(set(state_dict))
        hint = f" (its keys look like a {guess!r} checkpoint)" if guess and guess != format else ""
        raise ValueError(f"not a {format} checkpoint: it lacks {key!r}{hint}")
    tensor = state_dict[key]
    if tensor.ndim != ndim:
        raise ValueError(f"{key} must have {ndim} dimensions; got shape {tuple(tensor.shape)}")
    return tensor


def _heads(given: int | None, width: int, name: str, default: int | None, table_note: str) -> int:
    """The head count: ``given``, else ``default``; a positive divisor of ``width`` either way."""
    heads = default if given is None else given
    if heads is None:
        raise ValueError(
            f"{name} cannot be read from the weights and width {width} is not in the standard table "
            f"({table_note}): pass {name}"
        )
    if isinstance(heads, bool) or not isinstance(heads, numbers.Integral) or heads < 1 or width % heads:
        raise ValueError(f"{name} must be a positive integer dividing the width {width}; got {heads!r}")
    return int(heads)


def _patch_grid(position_table: torch.Tensor, extra_tokens: int, key: str) -> int:
    """Side of the square patch grid that a position table of ``grid**2 + extra_tokens`` rows encodes."""
    patches = position_table.shape[1] - extra_tokens
    grid = math.isqrt(max(patches, 0))
    if patches < 1 or grid * grid != patches:
        raise ValueError(
            f"{key} has {position_table.shape[1]} rows; expected a square number of patches"
            f"{' plus a CLS row' if extra_tokens else ''}"
        )
    return grid


def _patch_size(weight: torch.Tensor, key: str) -> int:
    if weight.shape[2] != weight.shape[3]:
        raise ValueError(f"{key} has a non-square kernel {tuple(weight.shape[2:])}; only square patches load")
    return int(weight.shape[2])


def _alpha_min(
    value: float | None, name: str, arguments: Mapping[str, Any], report: ConversionReport
) -> float:
    """``alpha_min`` from the caller or the checkpoint's arguments, in ``(0, 1]``."""
    if value is None:
        if name not in arguments:
            raise ValueError(
                f"{name} (the smallest shortcut coefficient, alpha_min) is not recorded in the checkpoint "
                f"and cannot be read from the weights: pass {name} (--min-decay on the command line), the "
                "value the model was trained with"
            )
        value = arguments[name]
        report.notes.append(f"{name}={value} from the checkpoint's training arguments")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1] (1 means standard residuals); got {value!r}")
    return float(value)


def _option(
    value: Any, name: str, arguments: Mapping[str, Any], default: Any, report: ConversionReport
) -> Any:
    """The caller's value, else the checkpoint's training argument, else ``default`` (each noted)."""
    if value is not None:
        return value
    if name in arguments:
        report.notes.append(f"{name}={arguments[name]!r} from the checkpoint's training arguments")
        return arguments[name]
    report.notes.append(f"{name} not recorded in the checkpoint: using {default!r}")
    return default


def _load_strict(model: nn.Module, mapper: _Mapper) -> nn.Module:
    """Load the mapped tensors into ``model``: every target key mapped or fresh, every shape equal."""
    expected = model.state_dict()
    report = mapper.report
    stray = sorted(set(mapper.target) - set(expected))
    unmapped = sorted(set(expected) - set(mapper.target) - set(report.fresh))
    if stray or unmapped:
        raise RuntimeError(
            f"the {report.format} converter and {type(model).__name__} disagree on the layout: mapped keys "
            f"the model lacks {stray}, model keys neither mapped nor fresh {unmapped}"
        )
    for key, tensor in mapper.target.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{report.mapped[key]} has shape {tuple(tensor.shape)} but {key} needs "
                f"{tuple(expected[key].shape)}: the model is configured from the checkpoint's embeddings and "
                "first blocks, and this tensor disagrees with them"
            )
    result = model.load_state_dict(mapper.target, strict=False)
    if set(result.missing_keys) != set(report.fresh) or result.unexpected_keys:
        raise RuntimeError(f"load_state_dict disagreed with the mapping: {result}")
    report.model_class = type(model).__name__
    return model.eval()


def _map_vit_block(mapper: _Mapper, source: str, target: str, width: int) -> None:
    """One pre-LN ViT block in timm's layout (``norm1``, packed ``attn.qkv``, ...) onto transformers'."""
    attention = f"{target}.attention"
    mapper.copy_linear(f"{source}.norm1", f"{target}.layernorm_before")
    mapper.split_qkv(
        f"{source}.attn.qkv", (f"{attention}.q_proj", f"{attention}.k_proj", f"{attention}.v_proj"), width
    )
    mapper.copy_linear(f"{source}.attn.proj", f"{attention}.o_proj")
    mapper.copy_linear(f"{source}.norm2", f"{target}.layernorm_after")
    mapper.copy_linear(f"{source}.mlp.fc1", f"{target}.mlp.fc1")
    mapper.copy_linear(f"{source}.mlp.fc2", f"{target}.mlp.fc2")


def _map_vit_embeddings(mapper: _Mapper, prefix: str) -> None:
    mapper.copy_linear("patch_embed.proj", f"{prefix}embeddings.patch_embeddings.projection")
    mapper.copy("cls_token", f"{prefix}embeddings.cls_token")
    mapper.copy("pos_embed", f"{prefix}embeddings.position_embeddings")


def _mae_architecture(
    state_dict: Mapping[str, torch.Tensor],
    format: str,
    num_attention_heads: int | None,
    decoder_num_attention_heads: int | None,
    decoder_width_key: str | None,
) -> dict[str, Any]:
    """ViTMAE config fields read from an MAE-layout state dict (heads from the arguments or the table)."""
    patch = _require(state_dict, "patch_embed.proj.weight", format, 4)
    width, channels = int(patch.shape[0]), int(patch.shape[1])
    patch_size = _patch_size(patch, "patch_embed.proj.weight")
    grid = _patch_grid(_require(state_dict, "pos_embed", format, 3), 1, "pos_embed")
    depth = _block_count(state_dict, "blocks")
    if depth == 0:
        raise ValueError(f"not a {format} checkpoint: it has no blocks.N encoder blocks")
    table = ", ".join(f"{w}: {h}" for w, h in VIT_ENCODER_HEADS.items())
    fields = {
        "hidden_size": width,
        "num_hidden_layers": depth,
        "num_attention_heads": _heads(
            num_attention_heads, width, "num_attention_heads", VIT_ENCODER_HEADS.get(width), table
        ),
        "intermediate_size": int(_require(state_dict, "blocks.0.mlp.fc1.weight", format, 2).shape[0]),
        "image_size": grid * patch_size,
        "patch_size": patch_size,
        "num_channels": channels,
        "qkv_bias": True,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "initializer": "mae",
    }
    if decoder_width_key is None:
        return fields
    decoder_width = int(_require(state_dict, decoder_width_key, format, 2).shape[0])
    decoder_depth = _block_count(state_dict, "decoder_blocks")
    if decoder_depth == 0:
        raise ValueError(f"the {format} checkpoint has a decoder_embed but no decoder_blocks.N")
    default = MAE_DECODER_HEADS if decoder_width % MAE_DECODER_HEADS == 0 else None
    fields |= {
        "decoder_hidden_size": decoder_width,
        "decoder_num_hidden_layers": decoder_depth,
        "decoder_num_attention_heads": _heads(
            decoder_num_attention_heads,
            decoder_width,
            "decoder_num_attention_heads",
            default,
            f"MAE decoders use {MAE_DECODER_HEADS} heads",
        ),
        "decoder_intermediate_size": int(
            _require(state_dict, "decoder_blocks.0.mlp.fc1.weight", format, 2).shape[0]
        ),
    }
    return fields


def _map_mae_decoder_body(mapper: _Mapper, fields: Mapping[str, Any]) -> None:
    """Decoder blocks, final norm, pixel head and position table: the same in both MAE layouts."""
    for index in range(fields["decoder_num_hidden_layers"]):
        _map_vit_block(
            mapper,
            f"decoder_blocks.{index}",
            f"decoder.decoder_layers.{index}",
            fields["decoder_hidden_size"],
        )
    mapper.copy("decoder_pos_embed", "decoder.decoder_pos_embed")
    mapper.copy_linear("decoder_norm", "decoder.decoder_norm")
    mapper.copy_linear("decoder_pred", "decoder.decoder_pred")


def _mae_loss_settings(
    mask_ratio: float | None,
    norm_pix_loss: bool | None,
    arguments: Mapping[str, Any],
    report: ConversionReport,
) -> dict[str, Any]:
    return {
        "mask_ratio": float(_option(mask_ratio, "mask_ratio", arguments, 0.75, report)),
        "norm_pix_loss": bool(_option(norm_pix_loss, "norm_pix_loss", arguments, False, report)),
    }


def convert_decay_mae(
    state_dict: Mapping[str, torch.Tensor],
    *,
    min_decay: float | None = None,
    num_attention_heads: int | None = None,
    decoder_num_attention_heads: int | None = None,
    mask_ratio: float | None = None,
    norm_pix_loss: bool | None = None,
    checkpoint_args: Mapping[str, Any] | None = None,
) -> tuple[ViTMAEDecayForPreTraining, ConversionReport]:
    """Convert the release's decayed MAE into a [`ViTMAEDecayForPreTraining`] with the full recipe.

    ``min_decay`` (the release's ``--min_decay``, ``alpha_min``), ``mask_ratio`` and ``norm_pix_loss`` default
    to ``checkpoint_args`` (the saved training arguments); ``min_decay`` has no default beyond them, as the
    weights do not record it. Head counts default to the standard ViT table and 16 for the decoder.
    The release builds ``depth / 2`` skip layers even when the decoder has fewer blocks; the unused ones
    are dropped (reported).
    """
    from .models import ViTMAEDecayConfig, ViTMAEDecayForPreTraining

    arguments = dict(checkpoint_args or {})
    report = ConversionReport(format="decay-mae")
    min_decay = _alpha_min(min_decay, "min_decay", arguments, report)
    fields = _mae_architecture(
        state_dict, "decay-mae", num_attention_heads, decoder_num_attention_heads, "decoder_embed.weight"
    )
    depth, decoder_depth = fields["num_hidden_layers"], fields["decoder_num_hidden_layers"]
    if depth % 2:
        raise ValueError(f"the release pairs encoder blocks for its skips, so its depth is even; got {depth}")
    released_skips = _block_count(state_dict, "skip")
    if released_skips != depth // 2:
        raise ValueError(
            f"the release has depth / 2 = {depth // 2} skip layers (skip.N); found {released_skips}"
        )
    fields |= _mae_loss_settings(mask_ratio, norm_pix_loss, arguments, report)
    fields |= {
        "shortcut_decay": 1.0 - min_decay,
        "shortcut_schedule": "linear",
        "encoder_final_layernorm": False,
        "zero_init_residual_branches": True,
        "decoder_skip_connections": True,
    }
    report.settings = fields
    config = ViTMAEDecayConfig(**fields)
    used_skips = config.num_decoder_skip_connections

    mapper = _Mapper(state_dict, report)
    _map_vit_embeddings(mapper, "vit.")
    for index in range(depth):
        _map_vit_block(mapper, f"blocks.{index}", f"vit.layers.{index}", fields["hidden_size"])
    mapper.copy("decoder_cls_token", "decoder.decoder_cls_token")
    mapper.copy_linear("decoder_embed", "decoder.decoder_embed")
    _map_mae_decoder_body(mapper, fields)
    for index in range(released_skips):
        source = f"skip.{index}"
        if index >= used_skips:
            mapper.drop_prefix(
                f"{source}.",
                f"unused in the release: it builds depth/2 = {released_skips} skip layers, but only the "
                f"first {decoder_depth} (one per decoder block) are called",
            )
            continue
        target = f"decoder.skip_layers.{index}"
        mapper.copy(f"{source}.mask_token", f"{target}.mask_token")
        mapper.copy_linear(f"{source}.fc.0", f"{target}.proj_in")
        mapper.copy_linear(f"{source}.fc.2", f"{target}.proj_out")
    mapper.check_all_used()
    report.notes.append(
        f"skip layer i feeds decoder block i with encoder block {depth - 1} - 2i (the release's pop order)"
    )
    return _load_strict(ViTMAEDecayForPreTraining(config), mapper), report


def convert_mae(
    state_dict: Mapping[str, torch.Tensor],
    *,
    shortcut_decay: float = 0.0,
    full_recipe: bool = False,
    num_attention_heads: int | None = None,
    decoder_num_attention_heads: int | None = None,
    mask_ratio: float | None = None,
    norm_pix_loss: bool | None = None,
    checkpoint_args: Mapping[str, Any] | None = None,
) -> tuple[ViTMAEDecayForPreTraining | ViTMAEDecayModel, ConversionReport]:
    """Convert a facebookresearch/mae checkpoint into the plain model, or retrofit the decay onto it.

    With the decoder (``mae_visualize_vit_*``) the result is a [`ViTMAEDecayForPreTraining`], encoder only
    (``mae_pretrain_vit_*``) a [`ViTMAEDecayModel`]. ``shortcut_decay=0`` gives upstream ViTMAE exactly
    (final LayerNorm kept, no skips). ``shortcut_decay > 0`` decays the encoder's shortcuts and keeps the
    rest plain; ``full_recipe=True`` also drops the final LayerNorm and, with a decoder, switches to the
    recipe's skip decoder, whose skip layers, ``decoder_cls_token`` and ``decoder_embed`` start fresh
    (reported) while the upstream ``mask_token`` and ``decoder_embed`` are dropped.
    """
    from .models import ViTMAEDecayConfig, ViTMAEDecayForPreTraining, ViTMAEDecayModel
    from .shortcut import validate_shortcut_decay

    shortcut_decay = validate_shortcut_decay(shortcut_decay)
    arguments = dict(checkpoint_args or {})
    report = ConversionReport(format="mae")
    has_decoder = "decoder_embed.weight" in state_dict
    fields = _mae_architecture(
        state_dict,
        "mae",
        num_attention_heads,
        decoder_num_attention_heads,
        "decoder_embed.weight" if has_decoder else None,
    )
    fields |= _mae_loss_settings(mask_ratio, norm_pix_loss, arguments, report)
    fields |= {
        "shortcut_decay": shortcut_decay,
        "shortcut_schedule": "linear",
        "encoder_final_layernorm": not full_recipe,
        "zero_init_residual_branches": False,
        "decoder_skip_connections": bool(full_recipe and has_decoder),
    }
    report.settings = fields
    config = ViTMAEDecayConfig(**fields)
    prefix = "vit." if has_decoder else ""

    mapper = _Mapper(state_dict, report)
    _map_vit_embeddings(mapper, prefix)
    for index in range(fields["num_hidden_layers"]):
        _map_vit_block(mapper, f"blocks.{index}", f"{prefix}layers.{index}", fields["hidden_size"])
    if full_recipe:
        mapper.drop_prefix("norm.", "the recipe removes the encoder's final LayerNorm")
    else:
        mapper.copy_linear("norm", f"{prefix}layernorm")
    if has_decoder:
        model = ViTMAEDecayForPreTraining(config)
        _map_mae_decoder_body(mapper, fields)
        if full_recipe:
            mapper.drop(
                "mask_token",
                "the recipe's decoder starts from decoder_cls_token; masked positions get the skip layers' "
                "own mask tokens",
            )
            mapper.drop_prefix(
                "decoder_embed.",
                "maps the encoder latent (encoder width) into the decoder; the recipe's decoder_embed maps "
                "decoder width to decoder width over [decoder_cls_token, positions]",
            )
            for key in model.state_dict():
                if key.startswith(("decoder.skip_layers.", "decoder.decoder_embed.")) or key.endswith(
                    "decoder_cls_token"
                ):
                    report.fresh[key] = "the recipe's skip decoder has no counterpart in plain MAE"
        else:
            mapper.copy("mask_token", "decoder.mask_token")
            mapper.copy_linear("decoder_embed", "decoder.decoder_embed")
    else:
        model = ViTMAEDecayModel(config)
        report.notes.append("encoder-only checkpoint: converted to ViTMAEDecayModel (no decoder)")
    mapper.check_all_used()
    return _load_strict(model, mapper), report


def convert_sit(
    state_dict: Mapping[str, torch.Tensor],
    *,
    min_sigma: float | None = None,
    num_attention_heads: int | None = None,
    num_classes: int | None = None,
    keep_sigma: bool = False,
    checkpoint_args: Mapping[str, Any] | None = None,
) -> tuple[DiTDecayTransformer2DModel, ConversionReport]:
    """Convert the release's SiT into a [`DiTDecayTransformer2DModel`] computing the same output.

    ``min_sigma`` (the release's ``--min-sigma``, ``alpha_min``) and ``num_classes`` default to
    ``checkpoint_args``. SiT's single timestep and label embedder is copied into every block (diffusers'
    DiT gives each block its own), and the timestep frequencies follow SiT (``timestep_freq_shift=0``).
    With ``learn_sigma`` (the release's default) the final projection also predicts a variance that the
    release's ``forward`` discards; its rows are dropped unless ``keep_sigma=True``, which keeps all
    ``2 * in_channels`` output channels (the first half is what the release returns).
    """
    from .models import DiTDecayTransformer2DModel

    arguments = dict(checkpoint_args or {})
    report = ConversionReport(format="sit")
    min_sigma = _alpha_min(min_sigma, "min_sigma", arguments, report)
    patch = _require(state_dict, "x_embedder.proj.weight", "sit", 4)
    width, in_channels = int(patch.shape[0]), int(patch.shape[1])
    patch_size = _patch_size(patch, "x_embedder.proj.weight")
    position_table = _require(state_dict, "pos_embed", "sit", 3)
    grid = _patch_grid(position_table, 0, "pos_embed")
    half = _block_count(state_dict, "enc_blocks")
    if half == 0 or _block_count(state_dict, "dec_blocks") != half:
        raise ValueError(
            f"SiT has as many dec_blocks.N as enc_blocks.N (at least one); found {half} and "
            f"{_block_count(state_dict, 'dec_blocks')}"
        )
    table = ", ".join(f"{w}: {h}" for w, h in SIT_HEADS.items())
    heads = _heads(num_attention_heads, width, "num_attention_heads", SIT_HEADS.get(width), table)
    hidden = _require(state_dict, "enc_blocks.0.mlp.fc1.weight", "sit", 2).shape[0]
    if hidden != 4 * width:
        raise ValueError(
            f"enc_blocks.0.mlp.fc1.weight has {hidden} rows; diffusers' DiT supports only mlp_ratio 4 "
            f"({4 * width} rows for width {width})"
        )
    frequencies = _require(state_dict, "t_embedder.mlp.0.weight", "sit", 2).shape[1]
    if frequencies != SIT_FREQUENCY_CHANNELS:
        raise ValueError(
            f"t_embedder.mlp.0.weight takes {frequencies} frequency channels; diffusers' DiT uses "
            f"{SIT_FREQUENCY_CHANNELS}"
        )
    labels = _require(state_dict, "y_embedder.embedding_table.weight", "sit", 2)
    num_classes = int(_option(num_classes, "num_classes", arguments, labels.shape[0] - 1, report))
    if labels.shape[0] != num_classes + 1:
        raise ValueError(
            f"y_embedder.embedding_table.weight has {labels.shape[0]} rows; diffusers' DiT needs "
            f"num_classes + 1 = {num_classes + 1} (the last is the null class of classifier-free guidance)"
        )
    final = _require(state_dict, "final_layer.linear.weight", "sit", 2)
    out_channels, remainder = divmod(final.shape[0], patch_size * patch_size)
    if remainder or out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(
            f"final_layer.linear.weight has {final.shape[0]} rows; expected patch_size**2 * in_channels "
            f"({patch_size**2 * in_channels}) or twice that with learn_sigma"
        )
    learn_sigma = out_channels == 2 * in_channels
    num_layers = 2 * half
    fields = {
        "num_attention_heads": heads,
        "attention_head_dim": width // heads,
        "in_channels": in_channels,
        "out_channels": out_channels if keep_sigma else in_channels,
        "num_layers": num_layers,
        "sample_size": grid * patch_size,
        "patch_size": patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": num_classes,
        "attention_bias": True,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "shortcut_decay": 1.0 - min_sigma,
        "shortcut_schedule": "linear",
        "long_skip_connections": True,
        "timestep_freq_shift": 0,
    }
    report.settings = fields
    model = DiTDecayTransformer2DModel(**fields)

    mapper = _Mapper(state_dict, report)
    mapper.copy_linear("x_embedder.proj", "pos_embed.proj")
    computed = model.pos_embed.pos_embed
    table = mapper.take("pos_embed")
    tolerance = max(1e-5, torch.finfo(table.dtype).eps)  # half-precision checkpoints round the table
    if table.shape != computed.shape or not torch.allclose(table.float(), computed.float(), atol=tolerance):
        raise ValueError(
            "pos_embed is not the fixed 2-D sin-cos table that diffusers' DiT computes (and does not store); "
            "a trained or modified position table cannot be converted"
        )
    report.verified["pos_embed"] = "equal to the sin-cos table diffusers' PatchEmbed computes (not stored)"
    for index in range(num_layers):
        source = f"enc_blocks.{index}" if index < half else f"dec_blocks.{index - half}"
        target = f"transformer_blocks.{index}"
        embedder = f"{target}.norm1.emb"
        for name in ("weight", "bias"):
            mapper.copy(f"t_embedder.mlp.0.{name}", f"{embedder}.timestep_embedder.linear_1.{name}")
            mapper.copy(f"t_embedder.mlp.2.{name}", f"{embedder}.timestep_embedder.linear_2.{name}")
        mapper.copy("y_embedder.embedding_table.weight", f"{embedder}.class_embedder.embedding_table.weight")
        mapper.copy_linear(f"{source}.adaLN_modulation.1", f"{target}.norm1.linear")
        attention = f"{target}.attn1"
        mapper.split_qkv(
            f"{source}.attn.qkv", (f"{attention}.to_q", f"{attention}.to_k", f"{attention}.to_v"), width
        )
        mapper.copy_linear(f"{source}.attn.proj", f"{attention}.to_out.0")
        mapper.copy_linear(f"{source}.mlp.fc1", f"{target}.ff.net.0.proj")
        mapper.copy_linear(f"{source}.mlp.fc2", f"{target}.ff.net.2")
        if index >= half:
            mapper.copy_linear(f"{source}.skip", f"long_skip_projections.{index - half}")
    mapper.copy_linear("final_layer.adaLN_modulation.1", "proj_out_1")
    if learn_sigma and not keep_sigma:
        for name in ("weight", "bias"):
            key = f"final_layer.linear.{name}"
            rows = mapper.take(key)
            # output features are ordered (p, q, channel), channel fastest: keep the first in_channels
            kept = rows.reshape(patch_size * patch_size, out_channels, *rows.shape[1:])[:, :in_channels]
            mapper.put(f"proj_out_2.{name}", kept.reshape(-1, *rows.shape[1:]).clone(), f"{key}[mean]")
            report.dropped[f"{key}[sigma]"] = (
                "learned-sigma output channels, which the release's forward discards "
                "(keep_sigma=True keeps them)"
            )
    else:
        mapper.copy_linear("final_layer.linear", "proj_out_2")
    mapper.check_all_used()
    report.notes.append(
        f"SiT's single t_embedder / y_embedder is copied into each of the {num_layers} blocks' norm1.emb"
    )
    if learn_sigma and keep_sigma:
        report.notes.append(
            f"keep_sigma: the model outputs {out_channels} channels; the release's forward returns the first "
            f"{in_channels}"
        )
    return _load_strict(model, mapper), report


CONVERTERS: dict[str, Callable[..., tuple[Any, ConversionReport]]] = {
    "decay-mae": convert_decay_mae,
    "mae": convert_mae,
    "sit": convert_sit,
}
"""The converter of each format in :data:`FORMATS`."""


def _image_processor(model: Any) -> Any | None:
    """Resize to the model's size and ImageNet normalisation, as both MAE releases trained; RGB only."""
    from transformers import ViTImageProcessorPil

    config = model.config
    if getattr(config, "num_channels", None) != 3:
        return None
    size = config.image_size
    return ViTImageProcessorPil(
        size={"height": size, "width": size}, image_mean=list(_IMAGENET_MEAN), image_std=list(_IMAGENET_STD)
    )


def convert_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    format: str,
    *,
    overwrite: bool = False,
    **options: Any,
) -> ConversionReport:
    """Convert the checkpoint file ``source`` into a ``save_pretrained`` folder ``destination``.

    ``format`` is one of :data:`FORMATS`; ``options`` go to that format's converter
    (:func:`convert_decay_mae`, :func:`convert_mae`, :func:`convert_sit`), with the checkpoint's training
    arguments as ``checkpoint_args``. The folder also gets ``conversion.json`` (the report) and, for the MAE
    formats, the image processor (resize, ImageNet mean and std). It is written next to ``destination`` and
    moved in when complete; an existing non-empty ``destination`` needs ``overwrite=True``.
    """
    from .training import publish_directory

    if format not in CONVERTERS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise FileExistsError(f"destination {destination} exists and is not a folder")
    if destination.is_dir() and any(destination.iterdir()) and not overwrite:
        raise FileExistsError(f"destination {destination} is not empty; pass overwrite=True to replace it")
    state_dict, arguments, entry = _read_checkpoint(Path(source))
    model, report = CONVERTERS[format](state_dict, checkpoint_args=arguments, **options)
    report.notes.insert(0, f"weights from {entry} of {source}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".partial")
    )
    try:
        model.save_pretrained(staging)
        processor = _image_processor(model) if format in ("decay-mae", "mae") else None
        if processor is not None:
            processor.save_pretrained(staging)
        record = {"source": str(Path(source).resolve()), **report.to_dict()}
        (staging / "conversion.json").write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        publish_directory(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


__all__ = [
    "CONVERTERS",
    "FORMATS",
    "ConversionReport",
    "convert_checkpoint",
    "convert_decay_mae",
    "convert_mae",
    "convert_sit",
    "load_checkpoint",
]
