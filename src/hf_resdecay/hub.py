"""Model cards: write evaluation results into a card's ``model-index`` and publish it.

Results go through ``huggingface_hub.ModelCard`` / ``EvalResult``, so the Hub renders them in the
evaluation widget and the papers-with-code style index. Re-running an evaluation replaces the entries of
the same metric on the same dataset split instead of piling duplicates up.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

from .atomic import atomic_write

TASK_TYPE = "image-classification"
GENERATION_TASK_TYPE = "unconditional-image-generation"
FEATURE_EXTRACTION_TAG = "image-feature-extraction"
"""The ``pipeline_tag`` of a pretrained MAE: its encoder serves transformers' ``image-feature-extraction``."""

DEFAULT_LICENSE = "apache-2.0"
"""The licence a training script writes into its card unless ``--license`` names another: the package's."""

_LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")


def check_license(license: str) -> None:
    """Raise ``ValueError`` naming ``--license`` unless it is written as a Hub licence identifier (lower
    case, e.g. ``apache-2.0``, ``mit``, ``cc-by-nc-4.0``, or ``other``): the Hub rejects an upload whose card
    metadata holds anything else, which would come to light only at the end of a training run."""
    if not _LICENSE_ID.fullmatch(license):
        raise ValueError(
            "--license must be a Hub licence identifier (lower case, e.g. apache-2.0, mit, cc-by-4.0, "
            f"other; see https://huggingface.co/docs/hub/repositories-licenses); got {license!r}"
        )


def card_model_id(output_dir: str | os.PathLike, hub_model_id: str | None, push_to_hub: bool) -> str:
    """What a training card's "How to load" passes to ``from_pretrained``: the Hub repo id when the run
    pushes there, else the output folder's absolute path, which loads from any working directory (the folder
    name alone is neither a Hub id nor a path that loads; a relative path only from where the run started)."""
    if push_to_hub and hub_model_id:
        return hub_model_id
    return str(Path(output_dir).expanduser().resolve())


def results_to_eval_results(results: dict, dataset_name: str, dataset_split: str) -> list[EvalResult]:
    """``EvalResult`` entries for the summary figures of ``evaluate_representations`` (and FID if present)."""
    summary = results.get("summary", {})
    names = {
        "knn_top1": (
            "accuracy",
            f"kNN top-1 ({results.get('knn', {}).get('protocol', 'DINO weighted kNN')})",
        ),
        "linear_probe_top1": (
            "accuracy",
            f"linear probe top-1 ({results.get('linear_probe', {}).get('protocol', 'paper')} protocol)",
        ),
        "effective_rank": ("effective_rank", "effective rank (RankMe, last layer)"),
        "fid": ("fid", "FID (Inception-v3, clean resize)"),
        "fd": (
            "frechet_distance",
            f"Fréchet distance ({results.get('fid', {}).get('features', 'features')})",
        ),
    }
    return [
        EvalResult(
            task_type=GENERATION_TASK_TYPE if key in ("fid", "fd") else TASK_TYPE,
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            dataset_split=dataset_split,
            metric_type=metric_type,
            metric_name=metric_name,
            metric_value=round(float(summary[key]), 4),
        )
        for key, (metric_type, metric_name) in names.items()
        if key in summary
    ]


def load_or_create_card(repo_id_or_dir: str | os.PathLike) -> ModelCard:
    """The card of a local checkpoint folder or Hub repo, or a fresh one when it has none."""
    source = Path(repo_id_or_dir)
    if source.is_dir():
        if (source / "README.md").exists():
            return ModelCard.load(source / "README.md")
        name = source.name
    else:
        try:
            return ModelCard.load(str(repo_id_or_dir))
        except (EntryNotFoundError, RepositoryNotFoundError):
            name = str(repo_id_or_dir).split("/")[-1]
    return ModelCard.from_template(ModelCardData(model_name=name, library_name="transformers"))


def update_card_results(card: ModelCard, new_results: list[EvalResult]) -> ModelCard:
    """Merge ``new_results`` into ``card``: same metric name on the same dataset split is replaced."""

    def key(result: EvalResult) -> tuple:
        return (result.metric_name, result.metric_type, result.dataset_type, result.dataset_split)

    fresh = {key(result) for result in new_results}
    kept = [result for result in card.data.eval_results or [] if key(result) not in fresh]
    card.data.eval_results = kept + list(new_results)
    if card.data.model_name is None:
        card.data.model_name = "model"
    return card


def save_card_atomic(card: ModelCard, path: str | os.PathLike) -> Path:
    """Write the card to ``path`` through a temporary file and a rename."""
    with atomic_write(path) as handle:
        handle.write(str(card))
    return Path(path)
