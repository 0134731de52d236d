"""Saved diffusers pipelines that load anywhere: point ``model_index.json`` at the code files shipped inside.

A pipeline saved with a decayed UNet or DiT records the component as
``["hf_resdecay.models.unet_2d_decay", "UNet2DDecayModel"]``. diffusers resolves that only for a local
folder in a process that has imported the module, and a Hub download refuses it outright (the name is
neither a diffusers module nor a file in the repo). :func:`make_pipeline_portable` rewrites such entries to
the code file that ``save_pretrained`` ships in the component folder (``["unet_2d_decay", ...]``).

diffusers (0.42) downloads only the component's own ``.py`` file from the Hub, not ``shortcut.py`` beside
it, so a portable pipeline is loaded from a full snapshot (:func:`load_pipeline`, or by hand:
``DiffusionPipeline.from_pretrained(snapshot_download(repo), trust_remote_code=True)``), with or without
``hf_resdecay`` installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .atomic import write_json_atomic

PACKAGE_PREFIX = "hf_resdecay."


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


def load_pipeline(
    repo_or_dir: str | os.PathLike, revision: str | None = None, trust_remote_code: bool = False, **kwargs
):
    """``DiffusionPipeline.from_pretrained`` on a local folder, or on a full snapshot of a Hub repo (so the
    code files a portable pipeline ships are all there). ``trust_remote_code`` stays off unless asked."""
    from diffusers import DiffusionPipeline
    from huggingface_hub import snapshot_download

    folder = Path(repo_or_dir)
    if not folder.is_dir():
        folder = Path(snapshot_download(str(repo_or_dir), revision=revision))
    return DiffusionPipeline.from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)
