"""Publishing a finished run: the output folder replaced atomically, and Hub uploads that retry."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .arguments import CommonTrainingArguments


def publish_directory(
    staging: str | os.PathLike, target: str | os.PathLike, marker: str = "config.json"
) -> Path:
    """Move every file of ``staging`` into ``target`` so that a crash never leaves a mixed model behind.

    The old ``marker`` (the file loaders look for first) is removed before, and the new one moved last:
    at any instant ``target`` holds either a complete model or no ``marker`` at all. Each move is atomic.
    """
    staging, target = Path(staging), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    (target / marker).unlink(missing_ok=True)
    files = sorted(path for path in staging.rglob("*") if path.is_file())
    for path in sorted(files, key=lambda path: path.name == marker):
        destination = target / path.relative_to(staging)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def with_retries(
    action: Callable[[], object], what: str, attempts: int = 4, base_delay: float = 2.0
) -> object:
    """Run ``action``, retrying with exponential backoff; then raise ``RuntimeError`` naming ``what``."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as error:  # network and Hub errors come in many types
            if attempt == attempts:
                raise RuntimeError(f"{what} failed after {attempts} attempts: {error}") from error
            delay = base_delay * 2 ** (attempt - 1)
            print(f"{what} failed ({error}); retrying in {delay:.0f} s ({attempt}/{attempts})", flush=True)
            time.sleep(delay)
    raise AssertionError("unreachable")


def push_folder(
    folder: str | os.PathLike,
    args: CommonTrainingArguments,
    what: str,
    script: str,
    path_in_repo: str | None = None,
) -> None:
    """Create ``args.hub_model_id`` if needed and upload ``folder`` (checkpoints, logs and hidden files stay
    local), each call retried with backoff ``args.hub_upload_attempts`` times."""
    from huggingface_hub import HfApi

    api = HfApi()
    with_retries(
        lambda: api.create_repo(args.hub_model_id, private=args.hub_private_repo, exist_ok=True),
        f"creating the Hub repo {args.hub_model_id}",
        attempts=args.hub_upload_attempts,
    )
    with_retries(
        lambda: api.upload_folder(
            repo_id=args.hub_model_id,
            folder_path=str(folder),
            path_in_repo=path_in_repo,
            commit_message=f"Upload {what} ({script})",
            ignore_patterns=["checkpoints/*", "logs/*", ".*"],
        ),
        f"uploading the {what} to {args.hub_model_id}",
        attempts=args.hub_upload_attempts,
    )


def push_final_model(output_dir: str | os.PathLike, args: CommonTrainingArguments, script: str) -> None:
    """Upload the finished ``output_dir``; when every retry fails, say so, point at the complete local
    copy, and exit with status 1."""
    try:
        push_folder(output_dir, args, "final model", script)
    except RuntimeError as error:
        print(
            f"error: {error}. The trained model is complete in {output_dir}; push it later with "
            f"`hf upload {args.hub_model_id} {output_dir}`.",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    print(f"pushed to {args.hub_model_id}", flush=True)
