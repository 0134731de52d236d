"""Find the residual blocks of a model and express each one's residual branch as a function of its input.

The residual-alignment analysis (arXiv 2401.09018) linearises the *branch* of each block, the skip
excluded: for a block computing ``block(h)`` with identity coefficient ``alpha``, the branch is
``f(h) = block(h) - alpha * h``. Blocks are recognised by type and by structure, never by attribute path
(transformers moved ViTMAE's layers between its 4.x and 5.x releases):

- transformers pre-LN ViT blocks (ViT, ViTMAE, DeiT, DINOv2 and any layer holding an attention module, an
  MLP and two LayerNorms): ``alpha = 1``;
- this package's decayed ViTMAE blocks (and any block exposing ``attention_alpha`` and ``mlp_alpha``): the
  block is two sublayers, ``g = a1 * h + A(h)`` then ``layer(h) = a2 * g + M(g)``, so the part of
  ``layer(h)`` that is proportional to ``h`` is ``a1 * a2 * h``; the block-level branch is
  ``f(h) = layer(h) - a1 * a2 * h = a2 * A(h) + M(a1 * h + A(h))``;
- transformers ResNet layers (``x -> act(F(x) + x)``): the activation comes after the addition, so the
  branch is ``f(h) = act'(F(h0) + h0) * F(h)``, the branch with the post-activation derivative at the
  point of analysis ``h0`` (its Jacobian is ``D J_F``); layers with a projection shortcut are skipped;
- diffusers ``BasicTransformerBlock`` (DiT; the conditioning keyword arguments, e.g. ``timestep`` and
  ``class_labels``, are captured with forward hooks and replayed) and ``ResnetBlock2D``
  (``(x + F(x, temb)) / s``, ``alpha = 1 / s``; blocks with a shortcut convolution or resampling skipped);
- any list of modules the user passes (``blocks=``), with ``alpha = 1`` unless given.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jvp

__all__ = [
    "BlockCapture",
    "ResidualBlock",
    "SkippedBlock",
    "capture_block_inputs",
    "discover_residual_blocks",
    "vit_mae_inputs",
]

KINDS = ("transformer", "resnet", "unet_resnet", "custom")
"""How a block's branch is built: ``"resnet"`` includes the post-activation derivative."""


@dataclass
class ResidualBlock:
    """One residual block and how to read its branch ``f(h) = block(h) - alpha * h``."""

    name: str
    """Qualified module name inside the model (``"<block i>"`` for user-passed modules)."""
    module: nn.Module
    kind: str = "custom"
    """One of :data:`KINDS`."""
    alpha: float = 1.0
    """Coefficient of the identity part of the whole block (``a1 * a2`` for a decayed ViTMAE block)."""
    family: str = "custom"
    """Readable origin, e.g. ``"ViTMAEDecayLayer"``, for reports."""
    sublayer_alphas: tuple[float, ...] = ()
    """Shortcut coefficients of the block's sublayers in forward order (attention, MLP) where it has its own
    (the per-sublayer schedule a model card lists; ``alpha`` is their product); empty otherwise."""

    def branch(
        self,
        h0: torch.Tensor,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The branch as a function of the block input alone, at the operating point ``h0``.

        ``args`` and ``kwargs`` are the block's other inputs (attention masks, ``temb``, DiT conditioning),
        replayed unchanged. With ``dtype`` the block's parameters and buffers, and floating inputs, are cast
        for the call (``torch.func.functional_call``; the module itself is not modified), so the analysis
        can run in float64.
        """
        kwargs = dict(kwargs or {})
        module = self.module
        if dtype is not None:
            args, kwargs = _cast_floating((tuple(args), kwargs), dtype)
            h0 = h0.to(dtype)
        target = module.layer if self.kind == "resnet" else module
        call = _caller(target, dtype)
        alpha = self.alpha
        if self.kind == "resnet":
            with torch.no_grad():
                pre = call(h0) + h0
                derivative = jvp(module.activation, (pre,), (torch.ones_like(pre),))[1]

            def resnet_branch(h: torch.Tensor) -> torch.Tensor:
                return derivative * call(h)

            return resnet_branch

        def branch(h: torch.Tensor) -> torch.Tensor:
            out = _first_tensor(call(h, *args, **kwargs))
            return out - alpha * h if alpha != 0 else out

        return branch


def _caller(module: nn.Module, dtype: torch.dtype | None) -> Callable[..., Any]:
    """``module`` itself, or a stateless call of it with floating parameters and buffers cast to ``dtype``."""
    if dtype is None:
        return module
    state = {
        name: tensor.detach().to(dtype) if tensor.is_floating_point() else tensor
        for name, tensor in (*module.named_parameters(), *module.named_buffers())
    }

    def call(*args: Any, **kwargs: Any) -> Any:
        return functional_call(module, state, args, kwargs)

    return call


@dataclass
class SkippedBlock:
    """A residual block left out of the analysis, and why (e.g. a projection shortcut)."""

    name: str
    family: str
    reason: str


@dataclass
class DiscoveredBlocks:
    """Result of :func:`discover_residual_blocks`: the blocks analysed, in module order, and those skipped."""

    blocks: list[ResidualBlock]
    skipped: list[SkippedBlock] = field(default_factory=list)

    def __iter__(self) -> Iterator[ResidualBlock]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> ResidualBlock:
        return self.blocks[index]


def _first_tensor(output: Any) -> torch.Tensor:
    """The hidden state in a block output: the tensor itself, or the first item of a tuple / ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = tuple(output.values())
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"a residual block must return a tensor or a tuple starting with one; got {type(output)}")


def _cast_floating(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast_floating(item, dtype) for item in value)
    if isinstance(value, list):
        return [_cast_floating(item, dtype) for item in value]
    if isinstance(value, dict):
        return {key: _cast_floating(item, dtype) for key, item in value.items()}
    return value


def _class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def _children_by_type(module: nn.Module, kind: type) -> list[nn.Module]:
    return [child for child in module.children() if isinstance(child, kind)]


def _is_prenorm_transformer_layer(module: nn.Module) -> bool:
    """A transformers ViT-family layer: an attention child, an MLP child and two LayerNorm children."""
    children = dict(module.named_children())
    names = [type(child).__name__.lower() for child in children.values()]
    has_attention = any("attention" in name for name in names)
    has_mlp = any(token in name for name in names for token in ("mlp", "ffn", "feedforward", "intermediate"))
    return has_attention and has_mlp and len(_children_by_type(module, nn.LayerNorm)) >= 2


def _is_transformers_resnet_layer(module: nn.Module) -> bool:
    """``x -> act(layer(x) + shortcut(x))``: has ``shortcut``, ``layer`` (Sequential) and ``activation``."""
    return (
        isinstance(getattr(module, "layer", None), nn.Sequential)
        and isinstance(getattr(module, "shortcut", None), nn.Module)
        and callable(getattr(module, "activation", None))
    )


def _is_diffusers_transformer_block(module: nn.Module) -> bool:
    return "BasicTransformerBlock" in _class_names(module) or (
        all(hasattr(module, name) for name in ("norm1", "attn1", "ff"))
        and type(module).__name__.endswith("TransformerBlock")
    )


def _is_diffusers_resnet_block(module: nn.Module) -> bool:
    return "ResnetBlock2D" in _class_names(module) or (
        all(hasattr(module, name) for name in ("conv1", "conv2", "norm1", "norm2", "output_scale_factor"))
        and type(module).__name__.startswith("Resnet")
    )


def _sublayer_alphas(module: nn.Module) -> tuple[float, float] | None:
    """``(attention_alpha, mlp_alpha)`` of a block with decayed sublayers, else ``None``."""
    first, second = getattr(module, "attention_alpha", None), getattr(module, "mlp_alpha", None)
    if isinstance(first, numbers.Real) and isinstance(second, numbers.Real):
        return float(first), float(second)
    return None


def _classify(name: str, module: nn.Module) -> ResidualBlock | SkippedBlock | None:
    """The block description of ``module``, a :class:`SkippedBlock`, or ``None`` when it is no block."""
    family = type(module).__name__
    sublayers = _sublayer_alphas(module)
    if sublayers is not None:
        return ResidualBlock(name, module, "transformer", sublayers[0] * sublayers[1], family, sublayers)
    if _is_diffusers_resnet_block(module):
        if getattr(module, "conv_shortcut", None) is not None:
            return SkippedBlock(name, family, "projection shortcut (conv_shortcut changes the channels)")
        if getattr(module, "upsample", None) is not None or getattr(module, "downsample", None) is not None:
            return SkippedBlock(name, family, "resampling shortcut (up/down-sampled skip)")
        return ResidualBlock(name, module, "unet_resnet", 1.0 / float(module.output_scale_factor), family)
    if _is_diffusers_transformer_block(module):
        return ResidualBlock(name, module, "transformer", 1.0, family)
    if _is_transformers_resnet_layer(module):
        if not isinstance(module.shortcut, nn.Identity):
            return SkippedBlock(name, family, "projection shortcut (1x1 convolution + BatchNorm)")
        return ResidualBlock(name, module, "resnet", 1.0, family)
    if _is_prenorm_transformer_layer(module):
        return ResidualBlock(name, module, "transformer", 1.0, family)
    return None


def _search_root(model: nn.Module) -> tuple[str, nn.Module]:
    """Where to look: a transformers head model's ``base_model`` (leaves out e.g. the MAE decoder)."""
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        for name, module in model.named_modules():
            if module is base:
                return name, base
    return "", model


def discover_residual_blocks(
    model: nn.Module,
    blocks: Sequence[nn.Module] | None = None,
    alphas: Sequence[float] | float | None = None,
) -> DiscoveredBlocks:
    """The residual blocks of ``model`` in module order, plus those skipped and why.

    Args:
        model: a transformers or diffusers model, or any ``nn.Module``. A transformers model with a head is
            searched inside its ``base_model`` only, so MAE decoder blocks are not mixed with encoder blocks.
        blocks: explicit modules to analyse instead (e.g. your own ResNet's blocks); each must map its input
            to an output of the same shape, and its branch is ``block(h) - alpha * h``.
        alphas: identity coefficients of the explicit ``blocks`` (one per block, or one for all; default 1;
            pass 0 for blocks without a skip, so the whole block is analysed).

    Raises:
        ValueError: ``alphas`` without ``blocks`` or of the wrong length, or no residual block found.
    """
    if blocks is not None:
        blocks = list(blocks)
        if not blocks or not all(isinstance(block, nn.Module) for block in blocks):
            raise ValueError("blocks must be a non-empty sequence of nn.Module")
        if alphas is None:
            values = [1.0] * len(blocks)
        elif isinstance(alphas, numbers.Real):
            values = [float(alphas)] * len(blocks)
        else:
            values = [float(alpha) for alpha in alphas]
            if len(values) != len(blocks):
                raise ValueError(f"alphas must hold one value per block ({len(blocks)}); got {len(values)}")
        names = {id(module): name for name, module in model.named_modules()}
        found = []
        for index, (module, alpha) in enumerate(zip(blocks, values, strict=True)):
            name = names.get(id(module)) or f"<block {index}>"
            found.append(ResidualBlock(name, module, "custom", alpha, type(module).__name__))
        return DiscoveredBlocks(found)
    if alphas is not None:
        raise ValueError("alphas is only accepted together with blocks")
    prefix, root = _search_root(model)
    found: list[ResidualBlock] = []
    skipped: list[SkippedBlock] = []

    def visit(module: nn.Module, name: str) -> None:
        result = _classify(name, module)
        if isinstance(result, ResidualBlock):
            found.append(result)
            return
        if isinstance(result, SkippedBlock):
            skipped.append(result)
            return
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(root, prefix)
    if not found:
        raise ValueError(
            f"no residual block found in {type(model).__name__}: supported are transformers ViT-family and "
            "ResNet layers and diffusers BasicTransformerBlock / ResnetBlock2D; pass blocks=[...] otherwise"
        )
    return DiscoveredBlocks(found, skipped)


@dataclass
class BlockCapture:
    """What one block received and returned during a forward pass (whole batch, detached)."""

    block: ResidualBlock
    args: tuple[Any, ...]
    """Positional inputs; ``args[input_index]`` is the hidden state when ``input_key`` is ``None``."""
    kwargs: dict[str, Any]
    input_key: str | int
    """Where the hidden state sits: a positional index or a keyword name."""
    output: torch.Tensor
    order: int
    """Rank of the block's first call in the forward pass."""

    @property
    def input(self) -> torch.Tensor:
        return self.args[self.input_key] if isinstance(self.input_key, int) else self.kwargs[self.input_key]

    def sample(self, index: int) -> tuple[torch.Tensor, tuple[Any, ...], dict[str, Any]]:
        """Hidden state and the other inputs of sample ``index`` (tensors of the batch size are sliced)."""
        batch = self.input.shape[0]
        sliced_args = tuple(_slice(value, index, batch) for value in self.args)
        sliced_kwargs = {key: _slice(value, index, batch) for key, value in self.kwargs.items()}
        if isinstance(self.input_key, int):
            h = sliced_args[self.input_key]
            rest = sliced_args[: self.input_key] + sliced_args[self.input_key + 1 :]
            if self.input_key != 0:
                raise ValueError("the hidden state must be a block's first positional input")
            return h, rest, sliced_kwargs
        h = sliced_kwargs.pop(self.input_key)
        return h, (), sliced_kwargs


def _slice(value: Any, index: int, batch: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[index : index + 1] if value.ndim >= 1 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(_slice(item, index, batch) for item in value)
    if isinstance(value, list):
        return [_slice(item, index, batch) for item in value]
    if isinstance(value, dict):
        return {key: _slice(item, index, batch) for key, item in value.items()}
    return value


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(item) for item in value)
    if isinstance(value, list):
        return [_detach(item) for item in value]
    if isinstance(value, dict):
        return {key: _detach(item) for key, item in value.items()}
    return value


_INPUT_NAMES = ("hidden_states", "hidden_state", "input_tensor", "x", "input", "sample")


class _StopForward(Exception):
    """Raised by the last block's hook: the rest of the model (heads, decoders) is not needed."""


@contextmanager
def vit_mae_inputs(model: nn.Module, inputs: Any) -> Iterator[Any]:
    """Read a ViTMAE without masking and in patch order: ``mask_ratio = 0`` and identity ``noise``.

    Applies to any model whose config has ``mask_ratio`` and whose forward takes ``noise``; other models
    and inputs pass through unchanged. The config is restored on exit.
    """
    configs = []
    for module in model.modules():
        config = getattr(module, "config", None)
        fresh = all(config is not seen for seen, _ in configs)
        if hasattr(module, "random_masking") and hasattr(config, "mask_ratio") and fresh:
            configs.append((config, config.mask_ratio))
    if not configs or "noise" not in inspect.signature(model.forward).parameters:
        yield inputs
        return
    kwargs = dict(inputs) if isinstance(inputs, Mapping) else {"pixel_values": inputs}
    pixels = kwargs.get("pixel_values")
    if "noise" not in kwargs and isinstance(pixels, torch.Tensor):
        patch = configs[0][0].patch_size
        patch = patch if isinstance(patch, (tuple, list)) else (patch, patch)
        num_patches = (pixels.shape[-2] // patch[0]) * (pixels.shape[-1] // patch[1])
        noise = torch.arange(num_patches, dtype=torch.float32, device=pixels.device)
        kwargs["noise"] = noise.expand(pixels.shape[0], num_patches)
    try:
        for config, _ in configs:
            config.mask_ratio = 0.0
        yield kwargs
    finally:
        for config, value in configs:
            config.mask_ratio = value


def capture_block_inputs(
    model: nn.Module,
    blocks: Sequence[ResidualBlock],
    inputs: torch.Tensor | Mapping[str, Any],
) -> list[BlockCapture]:
    """Run ``model`` once on ``inputs`` and record every block's inputs and output, in call order.

    ``inputs`` is a tensor (passed as the first positional argument, e.g. ``pixel_values``) or a mapping of
    keyword arguments (e.g. a DiT's ``hidden_states``, ``timestep`` and ``class_labels``). Forward hooks
    record the first call of each block; the forward pass stops after the last block has run. ViTMAE
    models are read unmasked in patch order (:func:`vit_mae_inputs`). Blocks never called are dropped.
    """
    records: dict[int, BlockCapture] = {}
    handles = []
    pending = {id(block.module) for block in blocks}

    def make_hooks(block: ResidualBlock):
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if id(module) in records:
                return
            if args:
                key: str | int = 0
            else:
                key = next((name for name in _INPUT_NAMES if name in kwargs), None)
                if key is None:
                    raise ValueError(f"cannot find the hidden-state input of block {block.name}")
            records[id(module)] = BlockCapture(
                block, _detach(tuple(args)), _detach(dict(kwargs)), key, torch.empty(0), len(records)
            )

        def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            record = records[id(module)]
            if record.output.numel() == 0:
                record.output = _first_tensor(output).detach()
                pending.discard(id(module))
                if not pending:
                    raise _StopForward

        return pre_hook, post_hook

    for block in blocks:
        pre_hook, post_hook = make_hooks(block)
        handles.append(block.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(block.module.register_forward_hook(post_hook, with_kwargs=True))
    try:
        with torch.no_grad(), vit_mae_inputs(model, inputs) as prepared:
            try:
                if isinstance(prepared, Mapping):
                    model(**prepared)
                else:
                    model(prepared)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return sorted(records.values(), key=lambda record: record.order)
