"""Pixel-space diffusion: the two training objectives and a sampler for UNet2D and DiT denoisers.

- ``"ddpm"``: epsilon prediction on the DDPM forward process (``DDPMScheduler.add_noise``), sampled with any
  diffusers noise scheduler (DDPM, DDIM).
- ``"flow"``: the linear path ``x_t = (1 - t) x_0 + t noise`` with velocity target ``noise - x_0`` (the SiT
  setting of the decay paper), sampled with ``FlowMatchEulerDiscreteScheduler``, whose convention it is.

The denoiser is called the same way for both families: ``model(x, timestep)`` for a ``UNet2DModel`` and
``model(x, timestep=..., class_labels=...)`` for a ``DiTTransformer2DModel`` (which needs class labels;
unconditional DiTs use one class, 0).
"""

from __future__ import annotations

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


def is_conditional(model: nn.Module) -> bool:
    """Whether ``model`` takes ``class_labels`` (DiT-style transformers do; UNet2D models do not)."""
    return getattr(getattr(model, "config", None), "num_embeds_ada_norm", None) is not None


def denoise(
    model: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None
) -> torch.Tensor:
    """The model's prediction (noise or velocity) for a batch at ``timestep`` (one per sample)."""
    if is_conditional(model):
        if class_labels is None:
            class_labels = torch.zeros(len(sample), dtype=torch.long, device=sample.device)
        return model(sample, timestep=timestep, class_labels=class_labels).sample
    return model(sample, timestep).sample


def diffusion_loss(
    model: nn.Module,
    scheduler: Any,
    clean: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean squared error of one training step on clean images in [-1, 1] (the objective follows
    ``scheduler``: a ``FlowMatchEulerDiscreteScheduler`` trains velocities, any other trains noise).

    Noise and timesteps are drawn with ``generator`` on its device (pass one on the model's device so that
    nothing is drawn on the CPU and copied), else on ``clean``'s device from the global RNG."""
    device = generator.device if generator is not None else clean.device  # draws where the generator is
    noise = torch.randn(clean.shape, generator=generator, device=device).to(clean)
    count = scheduler.config.num_train_timesteps
    if _is_flow(scheduler):
        t = torch.rand(len(clean), generator=generator, device=device).to(clean.device)
        expanded = t.view(-1, *([1] * (clean.ndim - 1)))
        noisy = ((1 - expanded) * clean + expanded * noise).to(clean.dtype)
        prediction = denoise(model, noisy, t * count, class_labels)
        target = noise - clean
    else:
        timesteps = torch.randint(0, count, (len(clean),), generator=generator, device=device).to(
            clean.device
        )
        noisy = scheduler.add_noise(clean, noise, timesteps)
        prediction = denoise(model, noisy, timesteps, class_labels)
        target = noise
    return nn.functional.mse_loss(prediction.float(), target.float())


def _is_flow(scheduler: Any) -> bool:
    return type(scheduler).__name__.startswith("FlowMatch")


@torch.inference_mode()
def sample_images(
    model: nn.Module,
    scheduler: Any,
    num_images: int,
    num_inference_steps: int = 50,
    class_labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Generate ``num_images`` images as float (N, C, H, W) in [0, 1], starting from Gaussian noise.

    ``model`` is a UNet2D or DiT denoiser trained with the objective of ``scheduler``; ``class_labels``
    (N,) conditions a DiT (default: class 0). The scheduler's timesteps are set to ``num_inference_steps``.
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
    sample = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels, device=device).long()
        if class_labels.shape != (num_images,):
            raise ValueError(f"class_labels must have shape ({num_images},); got {tuple(class_labels.shape)}")
    scheduler.set_timesteps(num_inference_steps)
    was_training = model.training
    model.eval()
    try:
        for t in scheduler.timesteps:
            timestep = t.expand(num_images).to(device)
            prediction = denoise(model, sample, timestep, class_labels)
            sample = scheduler.step(prediction, t, sample, generator=generator).prev_sample
    finally:
        model.train(was_training)
    return (sample.float() / 2 + 0.5).clamp(0, 1)


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
