"""Atomic writes: the target is replaced whole or not at all, with open()'s permissions."""

import os
import stat
from pathlib import Path

import pytest

from mt.files import atomic_directory, atomic_path, atomic_write, atomic_write_bytes


def test_replaces_the_target_with_umask_permissions(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    old = os.umask(0o022)
    try:
        atomic_write_bytes(target, b"new")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_failure_leaves_the_target_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_write(target) as stream:
        stream.write(b"half")
        raise RuntimeError("disk on fire")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_path_for_libraries_that_write_by_name(tmp_path: Path) -> None:
    target = tmp_path / "weights.bin"
    with atomic_path(target) as temp:
        assert temp.parent == tmp_path and temp.name.startswith(".weights.bin.")
        assert not target.exists()
        temp.write_bytes(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"


def test_atomic_directory_appears_whole_and_replaces_only_when_asked(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "model"
    with atomic_directory(out) as temp:
        (temp / "a.bin").write_bytes(b"a")
        assert not out.exists()
    assert sorted(p.name for p in out.iterdir()) == ["a.bin"]
    with pytest.raises(FileExistsError), atomic_directory(out) as temp:
        (temp / "b.bin").write_bytes(b"b")
    with atomic_directory(out, replace=True) as temp:
        (temp / "b.bin").write_bytes(b"b")
    assert sorted(p.name for p in out.iterdir()) == ["b.bin"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no temp or old dirs


def test_atomic_directory_failure_keeps_the_old_contents(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_directory(out, True) as temp:
        (temp / "half.bin").write_bytes(b"half")
        raise RuntimeError("disk on fire")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in out.iterdir()) == ["old.bin"]
