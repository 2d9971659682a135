"""Atomic file writes: nothing half-written ever appears under a final name.

Data goes to a hidden temp file beside the target (`.NAME.<random hex>.tmp`), is fsynced, gets the
permissions a plain `open()` would give, and is renamed over the target. If anything fails,
the temp file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
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
