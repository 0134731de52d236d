import json

import pytest

from hf_resdecay.atomic import atomic_write, write_json_atomic


def test_json_is_written_whole(tmp_path):
    path = write_json_atomic({"knn": [1.5, 2.0]}, tmp_path / "deep" / "results.json")
    assert json.loads(path.read_text()) == {"knn": [1.5, 2.0]}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "card.md"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_write(path) as handle:
        handle.write("half of the new")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["card.md"]


def test_binary_mode_and_bad_mode(tmp_path):
    with atomic_write(tmp_path / "x.bin", "wb") as handle:
        handle.write(b"\x00\x01")
    assert (tmp_path / "x.bin").read_bytes() == b"\x00\x01"
    with (
        pytest.raises(ValueError, match="mode must be 'w' or 'wb'; got 'a'"),
        atomic_write(tmp_path / "y", "a"),
    ):
        pass
