"""Saved diffusers pipelines that load anywhere: point ``model_index.json`` at the code files shipped inside.

A pipeline saved with a decayed UNet or DiT records the component as
``["hf_resdecay.models.unet_2d_decay", "UNet2DDecayModel"]``. diffusers resolves that only for a local
folder in a process that has imported the module, and a Hub download refuses it outright (the name is
neither a diffusers module nor a file in the repo). :func:`make_pipeline_portable` rewrites such entries to
the code file that ``save_pretrained`` ships in the component folder (``["unet_2d_decay", ...]``).

diffusers (0.42) downloads only the component's own ``.py`` file from the Hub, not ``shortcut.py`` beside
it, so a portable pipeline is loaded from a full snapshot (:func:`load_pipeline`, or by hand:
``DiffusionPipeline.from_pretrained(snapshot_download(repo), trust_remote_code=True)``), with or without
``hf_resdecay`` installed. Where it is installed, :func:`load_pipeline` builds this package's own components
from the installed classes and never runs the shipped files, so no ``trust_remote_code`` is needed.

:class:`DiTDecayPipeline` samples a class-conditional DiT with classifier-free guidance, in a VAE's latent
space (the paper's SiT setting) or in pixels; it needs the package to load (``load_pipeline`` or
``DiTDecayPipeline.from_pretrained``).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import DiTPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from .atomic import write_json_atomic
from .sampling import sample_latents, unscale_latents

PACKAGE_PREFIX = "hf_resdecay."

PACKAGE_CLASSES = {
    "UNet2DDecayModel": "hf_resdecay.models.unet_2d_decay",
    "DiTDecayTransformer2DModel": "hf_resdecay.models.dit_decay",
}
"""The package's diffusers models and their modules: what :func:`load_pipeline` builds without remote code."""


def make_pipeline_portable(pipeline_dir: str | os.PathLike) -> list[str]:
    """Rewrite the ``model_index.json`` of a saved pipeline in place; returns the components changed.

    Raises ``FileNotFoundError`` when the folder has no ``model_index.json``, or when a component of this
    package lacks its code file (it was not saved by ``save_pretrained`` of a decayed model).
    """
    folder = Path(pipeline_dir)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} does not exist: pipeline_dir must be a saved pipeline folder")
    index = json.loads(index_path.read_text())
    changed = []
    for component, entry in index.items():
        if not (isinstance(entry, list) and len(entry) == 2 and str(entry[0]).startswith(PACKAGE_PREFIX)):
            continue
        module = entry[0].rsplit(".", 1)[-1]
        if not (folder / component / f"{module}.py").is_file():
            raise FileNotFoundError(
                f"{component}/{module}.py is missing from {folder}: save the pipeline with save_pretrained"
            )
        index[component] = [module, entry[1]]
        changed.append(component)
    if changed:
        write_json_atomic(index, index_path)
    return changed


def _own_components(index: dict) -> dict[str, list[str]]:
    """Entries of ``model_index.json`` naming one of this package's classes, either through the shipped code
    file (``["unet_2d_decay", "UNet2DDecayModel"]``) or through the package module; each mapped to the
    installed module's entry."""
    own = {}
    for component, entry in index.items():
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] in PACKAGE_CLASSES):
            continue
        module = PACKAGE_CLASSES[entry[1]]
        if entry[0] in (module, module.rsplit(".", 1)[-1]):
            own[component] = [module, entry[1]]
    return own


def _mirror(folder: Path, mirror: Path, index: dict) -> None:
    """``folder`` seen through ``mirror``: its entries linked (copied where links are refused), with
    ``index`` as the mirror's ``model_index.json``."""
    for entry in folder.iterdir():
        if entry.name == "model_index.json":
            continue
        try:
            (mirror / entry.name).symlink_to(entry.absolute(), target_is_directory=entry.is_dir())
        except OSError:
            if entry.is_dir():
                shutil.copytree(entry, mirror / entry.name)
            else:
                shutil.copy2(entry, mirror / entry.name)
    (mirror / "model_index.json").write_text(json.dumps(index, indent=2))


def load_pipeline(
    repo_or_dir: str | os.PathLike, revision: str | None = None, trust_remote_code: bool = False, **kwargs
):
    """``DiffusionPipeline.from_pretrained`` on a local folder, or on a full snapshot of a Hub repo (so the
    code files a portable pipeline ships are all there). ``trust_remote_code`` stays off unless asked.

    Components of this package's classes (:data:`PACKAGE_CLASSES`) are built from the installed package,
    whatever ``model_index.json`` points at: the code files shipped beside them are never imported, so a
    pipeline trained with ``hf_resdecay`` loads without ``trust_remote_code``. A missing folder, a malformed
    id or a damaged file raises a one-line ``ValueError`` naming it before anything is loaded.
    """
    from diffusers import DiffusionPipeline
    from huggingface_hub import snapshot_download

    from .evaluation.features import check_model_source

    check_model_source(repo_or_dir, pipeline=True)
    folder = Path(repo_or_dir).expanduser()
    if not folder.is_dir():
        folder = Path(snapshot_download(str(repo_or_dir), revision=revision))
        check_model_source(folder, pipeline=True)
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    own = _own_components(index)
    pipeline_class = DiTDecayPipeline if index.get("_class_name") in PACKAGE_PIPELINES else DiffusionPipeline
    if not own:
        return pipeline_class.from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)
    for module, _ in own.values():
        importlib.import_module(module)  # diffusers resolves an imported module's classes by name
    with tempfile.TemporaryDirectory(prefix="hf_resdecay_pipeline_") as mirror:
        _mirror(folder, Path(mirror), {**index, **own})
        pipeline = pipeline_class.from_pretrained(mirror, trust_remote_code=trust_remote_code, **kwargs)
    pipeline.register_to_config(_name_or_path=str(folder))
    return pipeline


PACKAGE_PIPELINES = ("DiTDecayPipeline",)
"""The package's pipeline classes (``_class_name`` of a saved ``model_index.json``) that :func:`load_pipeline`
builds with the installed class."""


class DiTDecayPipeline(DiTPipeline):
    r"""Class-conditional DiT sampling with classifier-free guidance, in a VAE's latent space or in pixels.

    [`DiTPipeline`] with what a trained ``hf_resdecay`` DiT needs: any number of classes (the null class
    is ``num_embeds_ada_norm``, where upstream hard-codes ImageNet's 1000), any scheduler the model was
    trained for (``FlowMatchEulerDiscreteScheduler`` for the flow objective, DDPM/DDIM for epsilon), latents
    unscaled with the VAE's ``scaling_factor`` and ``shift_factor`` before decoding, ``vae=None`` for a
    pixel-space model, guidance on every channel (see :mod:`hf_resdecay.sampling`), and a default
    ``guidance_scale`` saved in ``model_index.json``. Works with stock ``DiTTransformer2DModel`` weights too.

    Args:
        transformer: the DiT denoiser (e.g. [`DiTDecayTransformer2DModel`]).
        scheduler: the diffusers scheduler of its training objective.
        vae (*optional*): the [`AutoencoderKL`] whose scaled latents the transformer models; None for pixels.
        id2label (*optional*): class names by id, for ``get_label_ids``.
        guidance_scale (`float`, defaults to 1.0): the default of ``__call__`` (1: no guidance).
    """

    _optional_components = ["vae"]

    def __init__(
        self,
        transformer: Any,
        scheduler: Any,
        vae: Any | None = None,
        id2label: dict[int, str] | None = None,
        guidance_scale: float = 1.0,
    ):
        _check_guidance_scale(guidance_scale, "guidance_scale")
        super().__init__(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
        labels = {str(key): value for key, value in id2label.items()} if id2label else None
        self.register_to_config(id2label=labels, guidance_scale=float(guidance_scale))

    @property
    def num_classes(self) -> int:
        """How many classes the transformer is conditioned on (1 for an unconditional DiT)."""
        return int(self.transformer.config.num_embeds_ada_norm)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        num_inference_steps: int = 50,
        output_type: str = "pil",
        return_dict: bool = True,
        batch_size: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate one image per entry of ``class_labels`` (ids in ``[0, num_classes)``); without labels,
        ``batch_size`` images of classes ``0, 1, ..., num_classes - 1, 0, ...``.

        ``guidance_scale``: classifier-free guidance (default: the pipeline's saved value; 1 = none).
        ``output_type``: ``"pil"``, ``"np"`` (N, H, W, C), ``"pt"`` (N, C, H, W), in [0, 1], or ``"latent"``
        (the transformer's output, before decoding). ``generator`` seeds the noise (a CPU generator gives
        the same images on any device).

        Adapted from `diffusers.DiTPipeline.__call__` (diffusers 0.42); differs as the class docstring says.
        """
        labels = self._labels(class_labels, batch_size)
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        _check_guidance_scale(scale, "guidance_scale")
        if scale != 1.0 and self.num_classes < 2:
            raise ValueError(f"guidance_scale {scale} needs a class-conditional transformer; use 1.0")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent'; got {output_type!r}")
        latents = sample_latents(
            self.transformer,
            self.scheduler,
            len(labels),
            num_inference_steps,
            labels,
            generator,
            scale,
            progress=self.progress_bar,
        )
        images = latents if output_type == "latent" else self.decode(latents)
        if output_type in ("np", "pil"):
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Float (N, C, H, W) images in [0, 1] from the transformer's samples (through the VAE, if any)."""
        if self.vae is not None:
            latents = self.vae.decode(unscale_latents(latents, self.vae.config).to(self.vae.dtype)).sample
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    def _labels(self, class_labels: Any, batch_size: int | None) -> torch.Tensor:
        if class_labels is None:
            if batch_size is None or batch_size < 1:
                raise ValueError(f"pass class_labels, or batch_size >= 1 without them; got {batch_size}")
            return torch.arange(batch_size) % self.num_classes
        labels = torch.as_tensor(class_labels).reshape(-1).long()
        if len(labels) == 0:
            raise ValueError("class_labels is empty")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(
                f"class_labels must be in [0, {self.num_classes}); got values from {int(labels.min())} to "
                f"{int(labels.max())}"
            )
        return labels


def _check_guidance_scale(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0 (1: no guidance); got {value!r}")
