"""Diffusion in pixel or latent space: the two training objectives and a sampler for UNet2D and DiT denoisers.

- ``"ddpm"``: epsilon prediction on the DDPM forward process (``DDPMScheduler.add_noise``), sampled with any
  diffusers noise scheduler (DDPM, DDIM).
- ``"flow"``: the linear path ``x_t = (1 - t) x_0 + t noise`` with velocity target ``noise - x_0`` (the SiT
  setting of the decay paper), sampled with ``FlowMatchEulerDiscreteScheduler``, whose convention it is.

The denoiser is called the same way for both families: ``model(x, timestep)`` for a ``UNet2DModel`` and
``model(x, timestep=..., class_labels=...)`` for a ``DiTTransformer2DModel`` (which needs class labels;
unconditional DiTs use one class, 0).

Class-conditional DiTs support classifier-free guidance (Ho & Salimans, 2022): training replaces a fraction
``label_dropout`` of the labels by the null class (:func:`null_class_label`, SiT drops 0.1), and sampling
mixes the conditional and null predictions, ``uncond + s * (cond - uncond)`` (:func:`guided_prediction`).
Guidance acts on every channel (the DiT/SiT releases guide only the first three of four latent channels).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

OBJECTIVES = ("ddpm", "flow")


def make_scheduler(objective: str, num_train_timesteps: int = 1000) -> Any:
    """The diffusers scheduler that trains and samples ``objective`` (``"ddpm"`` or ``"flow"``)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2; got {num_train_timesteps}")
    if objective == "ddpm":
        return DDPMScheduler(num_train_timesteps=num_train_timesteps)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps)


def _config(model: nn.Module) -> Any:
    """The model's config, through a DDP wrapper (``.module``), which does not forward attributes."""
    return getattr(getattr(model, "module", model), "config", None)


def is_conditional(model: nn.Module) -> bool:
    """Whether ``model`` takes ``class_labels`` (DiT-style transformers do; UNet2D models do not)."""
    return getattr(_config(model), "num_embeds_ada_norm", None) is not None


def null_class_label(model: nn.Module) -> int:
    """The label id of the null class ("no label") of a DiT: the extra row diffusers' label embedding keeps
    for classifier-free guidance, after the ``num_embeds_ada_norm`` real classes. ``ValueError`` when the
    model has no such row (it cannot be guided)."""
    num_classes = getattr(_config(model), "num_embeds_ada_norm", None)
    rows = None
    for module in model.modules():
        table = getattr(module, "embedding_table", None)
        if isinstance(table, nn.Embedding):
            rows = table.num_embeddings
            break
    if num_classes is None or rows is None or rows <= num_classes:
        raise ValueError(
            "classifier-free guidance needs a class-conditional DiT whose label embedding has a null-class "
            f"row (num_embeds_ada_norm + 1 rows); this model has {rows} row(s) for {num_classes} class(es)"
        )
    return int(num_classes)


def denoise(
    model: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None
) -> torch.Tensor:
    """The model's prediction (noise or velocity) for a batch at ``timestep`` (one per sample)."""
    if is_conditional(model):
        if class_labels is None:
            class_labels = torch.zeros(len(sample), dtype=torch.long, device=sample.device)
        return model(sample, timestep=timestep, class_labels=class_labels).sample
    return model(sample, timestep).sample


def guided_prediction(
    model: nn.Module,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    class_labels: torch.Tensor | None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """The model's prediction with classifier-free guidance ``uncond + s * (cond - uncond)``.

    ``guidance_scale`` 1 is the conditional prediction itself (one forward pass); any other scale runs the
    conditional and the null-class batch through the model together (one pass of twice the batch).
    """
    if guidance_scale == 1.0:
        return denoise(model, sample, timestep, class_labels)
    null = torch.full((len(sample),), null_class_label(model), dtype=torch.long, device=sample.device)
    if class_labels is None:
        class_labels = torch.zeros_like(null)
    labels = torch.cat([class_labels.to(null), null])
    both = denoise(model, torch.cat([sample, sample]), torch.cat([timestep, timestep]), labels)
    conditional, unconditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def diffusion_loss(
    model: nn.Module,
    scheduler: Any,
    clean: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    label_dropout: float = 0.0,
) -> torch.Tensor:
    """Mean squared error of one training step on clean images in [-1, 1] or scaled latents (the objective
    follows ``scheduler``: a ``FlowMatchEulerDiscreteScheduler`` trains velocities, any other trains noise).

    Noise and timesteps are drawn with ``generator`` on its device (pass one on the model's device so that
    nothing is drawn on the CPU and copied), else on ``clean``'s device from the global RNG. With
    ``label_dropout`` > 0 that fraction of ``class_labels``, drawn from the same generator, is replaced by
    the null class, so that the model also learns the unconditional prediction guidance needs."""
    if not 0.0 <= label_dropout < 1.0:
        raise ValueError(f"label_dropout must be in [0, 1); got {label_dropout}")
    device = generator.device if generator is not None else clean.device  # draws where the generator is
    noise = torch.randn(clean.shape, generator=generator, device=device).to(clean)
    count = scheduler.config.num_train_timesteps
    if _is_flow(scheduler):
        t = torch.rand(len(clean), generator=generator, device=device).to(clean.device)
    else:
        t = torch.randint(0, count, (len(clean),), generator=generator, device=device).to(clean.device)
    if label_dropout > 0 and class_labels is not None:
        class_labels = _dropped(model, class_labels, label_dropout, generator, device)
    if _is_flow(scheduler):
        expanded = t.view(-1, *([1] * (clean.ndim - 1)))
        noisy = ((1 - expanded) * clean + expanded * noise).to(clean.dtype)
        prediction = denoise(model, noisy, t * count, class_labels)
        target = noise - clean
    else:
        noisy = scheduler.add_noise(clean, noise, t)
        prediction = denoise(model, noisy, t, class_labels)
        target = noise
    return nn.functional.mse_loss(prediction.float(), target.float())


def _dropped(model: nn.Module, labels: torch.Tensor, probability: float, generator, device) -> torch.Tensor:
    """``labels`` with each replaced by the null class with ``probability`` (drawn from ``generator``)."""
    drop = torch.rand(len(labels), generator=generator, device=device).to(labels.device) < probability
    return torch.where(drop, torch.full_like(labels, null_class_label(model)), labels)


def _is_flow(scheduler: Any) -> bool:
    return type(scheduler).__name__.startswith("FlowMatch")


@torch.inference_mode()
def sample_latents(
    model: nn.Module,
    scheduler: Any,
    num_images: int,
    num_inference_steps: int = 50,
    class_labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    guidance_scale: float = 1.0,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> torch.Tensor:
    """Run the reverse process from Gaussian noise: ``num_images`` samples in the model's own space (pixels
    in [-1, 1], or scaled latents), in the model's dtype on its device.

    ``model`` is a UNet2D or DiT denoiser trained with the objective of ``scheduler``; ``class_labels``
    (N,) condition a DiT (default: class 0), guided with ``guidance_scale`` (1: no guidance). The initial
    noise is drawn on ``generator``'s device (the CPU without one) and moved, so a CPU generator gives the
    same samples on any device. ``progress`` wraps the timestep loop (e.g. a pipeline's progress bar).
    """
    if num_images < 1 or num_inference_steps < 1:
        raise ValueError(
            f"num_images and num_inference_steps must be >= 1; got {num_images} and {num_inference_steps}"
        )
    config = model.config
    size = config.sample_size
    shape = (num_images, config.in_channels, *((size, size) if isinstance(size, int) else size))
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    noise_device = generator.device if generator is not None else "cpu"
    sample = torch.randn(shape, generator=generator, device=noise_device).to(device=device, dtype=dtype)
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels, device=device).long()
        if class_labels.shape != (num_images,):
            raise ValueError(f"class_labels must have shape ({num_images},); got {tuple(class_labels.shape)}")
    scheduler.set_timesteps(num_inference_steps)
    was_training = model.training
    model.eval()
    try:
        for t in (progress or iter)(scheduler.timesteps):
            timestep = t.expand(num_images).to(device)
            prediction = guided_prediction(model, sample, timestep, class_labels, guidance_scale)
            sample = scheduler.step(prediction, t, sample, generator=generator).prev_sample
    finally:
        model.train(was_training)
    return sample


def sample_images(
    model: nn.Module,
    scheduler: Any,
    num_images: int,
    num_inference_steps: int = 50,
    class_labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Generate ``num_images`` pixel-space images as float (N, C, H, W) in [0, 1] (see
    :func:`sample_latents`; a latent model is sampled through its pipeline, which decodes)."""
    sample = sample_latents(
        model, scheduler, num_images, num_inference_steps, class_labels, generator, guidance_scale
    )
    return (sample.float() / 2 + 0.5).clamp(0, 1)


def scale_latents(latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
    """VAE latents in the space the denoiser learns: ``(z - shift_factor) * scaling_factor``, the factors
    from the VAE's config (Stable Diffusion's VAE: scale 0.18215, no shift), so latents have unit scale."""
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (latents - shift) * vae_config.scaling_factor


def unscale_latents(latents: torch.Tensor, vae_config: Any) -> torch.Tensor:
    """The inverse of :func:`scale_latents`: what the VAE's decoder takes."""
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return latents / vae_config.scaling_factor + shift


def image_grid(images: torch.Tensor, rows: int | None = None):
    """A PIL image tiling a float (N, C, H, W) batch in [0, 1] (``rows`` defaults to a near-square grid)."""
    from PIL import Image

    count, channels, height, width = images.shape
    rows = rows or max(1, int(count**0.5))
    columns = -(-count // rows)
    grid = torch.zeros(channels, rows * height, columns * width)
    for index, image in enumerate(images.cpu()):
        row, column = divmod(index, columns)
        grid[:, row * height : (row + 1) * height, column * width : (column + 1) * width] = image
    array = (grid * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if channels == 1 else array)
