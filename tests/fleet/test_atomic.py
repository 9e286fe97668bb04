"""fleet/atomic.py: a directory appears complete at its final name, or not at all."""

from __future__ import annotations

import pytest

from fleet.atomic import commit_dir, fresh_dir


def test_commit_dir_renames_a_complete_directory_into_place(tmp_path):
    tmp = fresh_dir(tmp_path / ".tmp-v1")
    (tmp / "a.bin").write_bytes(b"a" * 10)
    (tmp / "manifest.json").write_text("{}")
    commit_dir(tmp, tmp_path / "v1")
    assert not tmp.exists()
    assert sorted(p.name for p in (tmp_path / "v1").iterdir()) == ["a.bin", "manifest.json"]
    with pytest.raises(OSError):  # without `previous`, a directory never replaces another one
        commit_dir(fresh_dir(tmp_path / ".tmp-v1b"), tmp_path / "v1")


def test_commit_dir_keeps_the_previous_one_and_fresh_dir_clears_a_leftover(tmp_path):
    for version in ("1", "2", "3"):
        tmp = fresh_dir(tmp_path / "policy.tmp")
        (tmp / "version").write_text(version)
        commit_dir(tmp, tmp_path / "policy", previous=tmp_path / "policy.prev")
    assert (tmp_path / "policy" / "version").read_text() == "3"
    assert (tmp_path / "policy.prev" / "version").read_text() == "2"
    (tmp_path / "left.tmp").mkdir()
    (tmp_path / "left.tmp" / "half").write_text("x")
    assert list(fresh_dir(tmp_path / "left.tmp").iterdir()) == []
