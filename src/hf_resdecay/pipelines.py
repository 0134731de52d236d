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
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .atomic import write_json_atomic

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
    if not own:
        return DiffusionPipeline.from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)
    for module, _ in own.values():
        importlib.import_module(module)  # diffusers resolves an imported module's classes by name
    with tempfile.TemporaryDirectory(prefix="hf_resdecay_pipeline_") as mirror:
        _mirror(folder, Path(mirror), {**index, **own})
        pipeline = DiffusionPipeline.from_pretrained(mirror, trust_remote_code=trust_remote_code, **kwargs)
    pipeline.register_to_config(_name_or_path=str(folder))
    return pipeline
