"""Atomic file writes: nothing half-written ever appears under a final name.

Data goes to a hidden temp file beside the target (`.NAME.<random hex>.tmp`), is fsynced, gets the
permissions a plain `open()` would give, and is renamed over the target. If anything fails,
the temp file is removed and the target is untouched. Whole directories work the same way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; directories cannot be opened for fsync on every OS."""
    with contextlib.suppress(OSError):
        _fsync(directory)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path to write `path`'s new contents to (by any library); renamed into place after."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield temp
        _fsync(temp)
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)  # a failed write leaves nothing behind
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """A binary stream whose contents replace `path` atomically when the block ends."""
    with atomic_path(path) as temp, temp.open("wb") as stream:
        yield stream


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, atomically."""
    with atomic_write(path) as stream:
        stream.write(data)


@contextlib.contextmanager
def atomic_directory(path: Path, replace: bool = False) -> Iterator[Path]:
    """A temp directory beside `path` to fill; renamed to `path` once the block succeeds.

    A missing or empty `path` is taken over in one rename. A non-empty one raises
    FileExistsError, or with `replace` is moved aside, swapped and only then deleted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    temp.mkdir()
    try:
        yield temp
        for file in temp.rglob("*"):
            if file.is_file():  # open()'s permissions: some libraries write 0600 files
                os.chmod(file, 0o666 & ~_umask())
                _fsync(file)
        _swap_in(temp, path, replace)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)  # a failed export leaves nothing behind
        raise
    _fsync_dir(path.parent)


def _swap_in(new: Path, path: Path, replace: bool) -> None:
    """Rename directory `new` to `path`, replacing what is there only when allowed."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        os.replace(new, path)  # rename(2) may replace an empty directory
        return
    if not replace:
        raise FileExistsError(errno.EEXIST, "exists and is not empty", str(path))
    old = path.with_name(f".{path.name}.{secrets.token_hex(4)}.old")
    os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)  # put the previous contents back
        raise
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()
