"""Publishing a finished run: the output folder replaced atomically, and Hub uploads that retry."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .arguments import CommonTrainingArguments


PUBLISHED = ".published.json"
"""The list of files the last publish put in the folder (JSON): what the next publish replaces."""


def _exchange(first: Path, second: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # C library older than glibc 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(first))


def _siblings(target: Path) -> tuple[Path, Path]:
    return target.with_name(f".{target.name}.publish-new"), target.with_name(f".{target.name}.publish-old")


def recover_publish(target: str | os.PathLike) -> None:
    """Finish or undo a publish that a kill interrupted: where ``target`` is gone between the two renames of
    the fallback swap, the complete new folder is renamed in; leftover sibling folders are deleted."""
    target = Path(target)
    new, old = _siblings(target)
    if not target.exists() and (new / PUBLISHED).exists():
        os.replace(new, target)
    elif not target.exists() and old.exists():
        os.replace(old, target)
    shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def _make_folder(new: Path, target: Path, relative: Path, step: Callable[[str], None]) -> None:
    """``new / relative`` and its missing parents, each with the mode of its counterpart in ``target``."""
    for part in reversed([relative, *relative.parents][:-1]):
        if not (new / part).is_dir():
            (new / part).mkdir()
            shutil.copymode(target / part, new / part)
            step(f"made {new / part}")


def _carry(source: Path, new: Path, target: Path, relative: Path, step: Callable[[str], None]) -> None:
    """``source`` into the new folder: a hard link (the same file), a copy where links fail."""
    _make_folder(new, target, relative.parent, step)
    destination = new / relative
    if source.is_symlink():
        os.symlink(os.readlink(source), destination)
    else:
        try:
            os.link(source, destination)
        except OSError:
            shutil.copy2(source, destination)
    step(f"linked {destination}")


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def publish_directory(
    staging: str | os.PathLike,
    target: str | os.PathLike,
    marker: str = "config.json",
    on_step: Callable[[str], None] | None = None,
) -> Path:
    """Replace the model in ``target`` by the files of ``staging`` (model, card, ``results.json``...) in one
    atomic step, keeping everything else in ``target`` (checkpoints, logs, other files).

    The new folder is built beside ``target``: the staged files, the list of them (:data:`PUBLISHED`), and
    hard links to every file of ``target`` that the previous publish did not put there (a copy where links
    are not possible). Then the two folders are exchanged with one ``renameat2(RENAME_EXCHANGE)`` and the old
    one is deleted. Guarantee, for a kill (even SIGKILL) at any instant: ``target`` holds either the complete
    previous model with its ``results.json`` or the complete new one, never a mix, and the other files stay
    (the same inodes: open log files keep writing into ``target``). Where the exchange is not available (not
    Linux, some network file systems) the swap is two renames: a kill between them leaves no ``target``
    but the complete new folder beside it, which :func:`recover_publish` (run by the next publish) renames
    in. A file written into ``target`` while a publish runs may be lost: publish from the run that holds the
    folder's lock. ``marker`` is the file loaders read first: a ``staging`` without it is refused as
    incomplete. ``on_step`` (tests only) is called with a description after each file-system operation.
    """
    staging, target = Path(staging), Path(target)
    step = on_step or (lambda what: None)
    if not (staging / marker).is_file():
        raise ValueError(f"{staging} holds no {marker}: an incomplete model is never published")
    if target.is_symlink():
        target = target.resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_publish(target)
    new, old = _siblings(target)
    published = sorted(path.relative_to(staging).as_posix() for path in staging.rglob("*") if path.is_file())
    try:
        os.replace(staging, new)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
        shutil.copytree(staging, new)  # staged on another file system
        shutil.rmtree(staging)
    step(f"moved {staging} to {new}")
    (new / PUBLISHED).write_text(json.dumps(published))
    step(f"wrote {new / PUBLISHED}")
    os.chmod(new, stat.S_IMODE(target.stat().st_mode) if target.exists() else _default_mode())
    try:
        previous = set(json.loads((target / PUBLISHED).read_text()))
    except (OSError, ValueError):
        previous = set()
    replaced = previous | set(published) | {PUBLISHED}
    for folder, dirs, files in os.walk(target) if target.exists() else ():
        here = Path(folder)
        links = [name for name in dirs if (here / name).is_symlink()]
        if not dirs and not files and here != target:  # an empty folder is kept too
            _make_folder(new, target, here.relative_to(target), step)
        for name in sorted(files) + sorted(links):
            relative = (here / name).relative_to(target)
            if relative.as_posix() not in replaced:
                _carry(here / name, new, target, relative, step)
    if not target.exists():
        os.replace(new, target)
        step(f"renamed {new} to {target}")
    elif _exchange(new, target):
        step(f"exchanged {new} and {target}")
        shutil.rmtree(new)
        step(f"deleted the previous model ({new})")
    else:
        os.replace(target, old)
        step(f"renamed {target} to {old}")
        os.replace(new, target)
        step(f"renamed {new} to {target}")
        shutil.rmtree(old)
        step(f"deleted the previous model ({old})")
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
