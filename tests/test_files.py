"""Atomic writes: the target is replaced whole or not at all, with open()'s permissions."""

import errno
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mt.errors import MtError
from mt.files import atomic_directory, atomic_path, atomic_write, atomic_write_bytes


def test_a_new_file_gets_umask_permissions(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    old = os.umask(0o027)
    try:
        atomic_write_bytes(target, b"new")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


@pytest.mark.parametrize("mode", [0o600, 0o750, 0o664])
def test_an_existing_file_keeps_its_permissions(tmp_path: Path, mode: int) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    target.chmod(mode)
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == mode


def test_a_symlink_is_written_through(tmp_path: Path) -> None:
    real = tmp_path / "real.txt"
    real.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to("real.txt")
    atomic_write_bytes(link, b"new")
    assert link.is_symlink() and os.readlink(link) == "real.txt"
    assert real.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.txt", "real.txt"]


def test_a_fifo_is_written_to_not_replaced(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a writer's open() needs a reader
    try:
        atomic_write_bytes(fifo, b"through the pipe")
        assert os.read(reader, 100) == b"through the pipe"
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo"]


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


# --- a full disk: one line naming the file, the previous file intact -----------------------------


def save_torch(path: Path) -> None:
    torch.save({"w": torch.ones(100_000)}, path)  # 400 kB: more than is left


def save_safetensors(path: Path) -> None:
    save_file({"w": torch.ones(100_000)}, str(path))


@pytest.mark.parametrize("save", [save_torch, save_safetensors])
def test_a_library_failing_on_a_full_disk_is_one_line(save, small_fs, tmp_path: Path) -> None:
    disk = small_fs.mount(tmp_path / "disk")
    target = disk / "model.bin"
    target.write_bytes(b"previous")
    small_fs.fill(disk)
    with pytest.raises(MtError) as err, atomic_path(target) as temp:
        save(temp)
    assert str(err.value) == f"{target}: cannot write (No space left on device)"
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in disk.iterdir()) == [".filler", "model.bin"]


def test_a_directory_on_a_full_disk_is_one_line(small_fs, tmp_path: Path) -> None:
    disk = small_fs.mount(tmp_path / "disk")
    (disk / "export").mkdir()
    (disk / "export" / "old.bin").write_bytes(b"old")
    small_fs.fill(disk)
    with pytest.raises(MtError) as err, atomic_directory(disk / "export", replace=True) as temp:
        (temp / "model.bin").write_bytes(bytes(100_000))
    assert str(err.value) == f"{disk / 'export'}: cannot write (No space left on device)"
    assert sorted(p.name for p in disk.iterdir()) == [".filler", "export"]
    assert sorted(p.name for p in (disk / "export").iterdir()) == ["old.bin"]


def test_os_errors_name_the_file_and_the_cause(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(MtError) as err, atomic_write(target) as stream:
        stream.write(b"half")
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))  # as a buffered write raises it
    assert str(err.value) == f"{target}: cannot write (Disk quota exceeded)"
    # A library that keeps the OS error's number in its own message (safetensors' Rust io::Error)
    with pytest.raises(MtError) as err, atomic_path(target):
        raise RuntimeError("Error while serializing: I/O error: No space left (os error 28)")
    assert str(err.value) == f"{target}: cannot write (No space left on device)"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_errors_that_are_not_failed_writes_pass_through(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(FileNotFoundError), atomic_path(target):
        (tmp_path / "missing.txt").read_bytes()  # another file: a failed read, not a write
    with pytest.raises(MtError, match=r"^bad input$"), atomic_path(target):
        raise MtError("bad input")
    with pytest.raises(ValueError, match=r"^a bug"), atomic_path(target):
        raise ValueError("a bug: the disk takes data, so this keeps its traceback")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
