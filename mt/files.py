"""Files: atomic writes (nothing half-written ever appears under a final name), hashes, stdout.

Data goes to a hidden temp file beside the target (`.NAME.<random hex>.tmp`), is fsynced, gets the
permissions a plain `open()` would give (an existing file's own, else 0666 less the umask), and
is renamed over the target. If anything fails, the temp file is removed and the target is
untouched. A symlink is written through: its target is replaced, the link stays. A target that
is not a regular file (a FIFO, a device such as /dev/stdout) cannot be replaced by a rename and
is written directly. Whole directories work the same way.

A write the file system refuses (a full disk, a quota, a read-only mount) becomes one line,
`PATH: cannot write (No space left on device)`, whichever library was writing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from mt.errors import MtError

# Bytes written to learn whether a file system still takes data. More than any library's
# last failed write can leave free: when the disk is full, this write fails too.
_PROBE_BYTES = 1 << 20


_HASH_CHUNK = 1 << 20


def stream_sha256(stream: BinaryIO) -> str:
    """sha256 hex of everything left in a binary stream (hashlib.file_digest needs 3.11)."""
    digest = hashlib.sha256()
    while chunk := stream.read(_HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


# file_sha256's answers in this process, by the file's identity and its inode's change time.
_DIGESTS: dict[tuple[str, int, int, int, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 hex of a file's bytes as stored; each file is read once per process while it stays
    as it is (a local dataset folder is hashed each time a split of it is opened).

    The key holds the inode's change time, which every write sets, even one that puts back the
    old modification time (``cp -p``, ``rsync -a``).
    """
    with open(path, "rb") as stream:
        st = os.fstat(stream.fileno())
        key = (
            os.path.realpath(path),
            st.st_dev,
            st.st_ino,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )
        if key not in _DIGESTS:
            _DIGESTS[key] = stream_sha256(stream)
        return _DIGESTS[key]


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def fsync(path: Path) -> None:
    """Write a file's data to its disk (a rename after it is then durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; directories cannot be opened for fsync on every OS."""
    with contextlib.suppress(OSError):
        fsync(directory)


def _refusal(directory: Path) -> str | None:
    """Why `directory`'s file system refuses to store data now (e.g. it is full), or None."""
    try:
        with tempfile.TemporaryFile(dir=directory) as probe:
            probe.write(bytes(_PROBE_BYTES))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _write_failure(exc: Exception, path: Path, temp: Path) -> str | None:
    """The cause, as the OS words it, when `exc` is a failed write to `temp`; else None."""
    if isinstance(exc, OSError):
        name = None if exc.filename is None else Path(os.fsdecode(exc.filename))
        if name is not None and name != temp and temp not in name.parents:
            return None  # another file: a failed read
        if exc.strerror:
            return exc.strerror
    # Libraries that write by themselves word the OS error their own way: safetensors (Rust)
    # says "(os error 28)", pyarrow "[errno 28]"; torch.save only "unexpected pos", and then
    # the file system is asked directly.
    if match := re.search(r"(?:os error|\[errno) (\d+)", str(exc), re.IGNORECASE):
        return os.strerror(int(match.group(1)))
    return _refusal(path.parent) or (str(exc) if isinstance(exc, OSError) else None)


@contextlib.contextmanager
def write_errors(path: Path, temp: Path | None = None) -> Iterator[None]:
    """Turn a failed write of `path` (through `temp`, its temp file or directory) into MtError.

    The message is `PATH: cannot write (CAUSE)`. Anything else raised in the block (an error
    naming another file, a bug while the file system still takes data) passes through.
    """
    path = Path(path)
    try:
        yield
    except MtError:
        raise
    except Exception as exc:
        cause = _write_failure(exc, path, Path(temp) if temp is not None else path)
        if cause is None:
            raise
        raise MtError(f"{path}: cannot write ({cause})") from None


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path to write `path`'s new contents to (by any library); renamed into place after.

    `path` itself where it is an existing file other than a regular one (a FIFO, a device).
    """
    path = Path(path)
    try:
        existing: os.stat_result | None = os.stat(path)  # through symlinks
    except OSError:
        existing = None
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        with write_errors(path):
            yield path  # no rename can replace a device or a pipe: write to it as open() would
        return
    target = Path(os.path.realpath(path))  # a symlink's target is replaced, the link kept
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    mode = 0o666 & ~_umask() if existing is None else stat.S_IMODE(existing.st_mode)
    try:
        with write_errors(path, temp):
            yield temp
            fsync(temp)
            os.chmod(temp, mode)
            os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)  # a failed write leaves nothing behind
        raise
    _fsync_dir(target.parent)


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
    shown = Path(path)  # in messages, as the user wrote it
    path = Path(os.path.realpath(shown))  # a symlink's target is filled, the link kept
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with write_errors(shown, temp):
            temp.mkdir()
            yield temp
            for file in temp.rglob("*"):
                if file.is_file():  # open()'s permissions: some libraries write 0600 files
                    os.chmod(file, 0o666 & ~_umask())
                    fsync(file)
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


@contextlib.contextmanager
def stdout_errors() -> Iterator[None]:
    """While writing stdout: its reader left (`mt ... | head`): exit 141 quietly, as filters do;
    it cannot take more (`> FILE` on a full disk): MtError saying so."""
    try:
        yield
    except BrokenPipeError:
        _drop_stdout()
        raise SystemExit(128 + signal.SIGPIPE) from None
    except OSError as exc:
        if exc.filename is not None:  # a file's, named: not stdout's
            raise
        _drop_stdout()
        raise MtError(f"stdout: cannot write ({exc.strerror or exc})") from None


def _drop_stdout() -> None:
    """Point stdout at /dev/null: Python would fail again flushing it at exit, noisily."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
