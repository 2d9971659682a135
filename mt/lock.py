"""One trainer per run directory: an exclusive lock on RUN/lock, held for the whole run.

The lock is an `fcntl.flock`, which the kernel drops when its holder dies, so a crash or a
kill -9 never leaves a stale lock behind. The file also names its holder (`pid N host H`, and
when it started, so that a PID reused by another process after a crash is not taken for it),
for two reasons: the refusal can say who holds the run, and on a shared filesystem (NFS,
Lustre) where flock may be node-local or unsupported, a lock taken on another host is still
refused, from what the file says. Such a lock cannot be checked from here, so it is never
broken silently: the message says to delete the file once that run is over, unless the holder
was an earlier run of this same SLURM job (`job J restart R`: a requeued job keeps its id, and
SLURM ends a run before it starts the next, unless it lost a node that still runs it), or of
this same torchrun job that torchrun restarted (`restart R.E`, E its restarts; outside SLURM the
job is torchrun's rendezvous id, `torchrun/ID`, where it names one); on this host, only once
its process is gone (another launch may reuse a rendezvous id). Without flock at all, the file
is read and written by one process at a time, the one that created RUN/lock.claim (O_EXCL).
A clean exit empties the file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mt.errors import MtError

LOCK_FILE = "lock"
CLAIM_FILE = "lock.claim"  # without flock: who is reading and writing the lock file now
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}  # filesystems without flock
_HOLDER = re.compile(
    r"pid (\d+) host (\S+)(?: job (\S+) restart (\d+)(?:\.(\d+))?)?(?: started (\d+))?"
)

log = logging.getLogger("mt")


def job_id() -> str:
    """This job's name, the same in each of its restarts: Slurm's job id (after its cluster's
    name: ids are per cluster), else torchrun's rendezvous id where it was given one (its
    default, "none", names no job); "" outside both."""
    env = os.environ
    job, cluster = env.get("SLURM_JOB_ID", ""), env.get("SLURM_CLUSTER_NAME")
    if job:
        return f"{cluster}/{job}" if cluster else job
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    return f"torchrun/{run_id}" if run_id not in ("", "none") else ""


@dataclass(frozen=True)
class Holder:
    """The process a lock file names."""

    pid: int
    host: str
    job: str = ""  # SLURM_JOB_ID (after SLURM_CLUSTER_NAME/, if set), else torchrun/RUN_ID
    restart: int = 0  # SLURM_RESTART_COUNT: how many times that job was requeued
    started: str = ""  # when the process started (clock ticks after boot): its PID's owner
    elastic: int = 0  # TORCHELASTIC_RESTART_COUNT: how many times torchrun restarted its workers

    @classmethod
    def me(cls) -> Holder:
        """This process."""
        env, job = os.environ, job_id()
        restart = int(env.get("SLURM_RESTART_COUNT") or 0)
        elastic = int(env.get("TORCHELASTIC_RESTART_COUNT") or 0) if job else 0
        pid = os.getpid()
        return cls(pid, socket.gethostname(), job, restart, start_time(pid) or "", elastic)

    def alive(self) -> bool:
        """Whether the holder still runs on this host: its PID exists and, where both are
        known, started when the holder did (a PID reused by another process is not it)."""
        if not pid_alive(self.pid):
            return False
        now = start_time(self.pid)
        return not (self.started and now) or now == self.started

    def earlier_run_of(self, other: Holder) -> bool:
        """Whether this holder was a run of `other`'s job before SLURM requeued it or torchrun
        restarted its workers (a requeue starts torchrun's count anew)."""
        before = (self.restart, self.elastic) < (other.restart, other.elastic)
        return bool(self.job) and self.job == other.job and before


def _read_holder(fd: int) -> Holder | None:
    """The holder the lock file names, or None if it is empty (free) or unreadable."""
    return _parse_holder(os.pread(fd, 4096, 0).decode("utf-8", errors="replace"))


def _parse_holder(text: str) -> Holder | None:
    """The holder a lock file's text names, or None."""
    match = _HOLDER.match(text)
    if not match:
        return None
    pid, host, job, restart, elastic, started = match.groups()
    return Holder(int(pid), host, job or "", int(restart or 0), started or "", int(elastic or 0))


def _write_holder(fd: int, holder: Holder | None) -> None:
    """Name `holder` in the lock file, or empty it."""
    os.ftruncate(fd, 0)
    if holder is not None:
        elastic = f".{holder.elastic}" if holder.elastic else ""
        job = f" job {holder.job} restart {holder.restart}{elastic}" if holder.job else ""
        started = f" started {holder.started}" if holder.started else ""
        os.pwrite(fd, f"pid {holder.pid} host {holder.host}{job}{started}\n".encode(), 0)
    os.fsync(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this host (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def start_time(pid: int) -> str | None:
    """When process `pid` started, in clock ticks after boot (Linux's /proc); None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after the command name, which may hold spaces
    return fields[19] if len(fields) > 19 else None  # field 22 of stat, the 20th after it


def _in_use(run_dir: Path, holder: Holder | None) -> str:
    """The one-line refusal."""
    who = f"PID {holder.pid} on host {holder.host}" if holder else "another process"
    return f"{run_dir}: the run directory is in use by {who}"


def _flock(fd: int, run_dir: Path) -> bool:
    """Take the flock, or MtError if another process has it; False if flock is unsupported."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise MtError(_in_use(run_dir, _read_holder(fd))) from None
    except OSError as exc:
        if exc.errno not in _NO_FLOCK:
            raise
        log.warning("%s: no flock on this filesystem; the lock relies on its PID and host", run_dir)
        return False
    return True


def _claim(fd: int, run_dir: Path, path: Path, flocked: bool) -> None:
    """Write this process into the lock file unless it names a holder that may be alive."""
    holder, me = _read_holder(fd), Holder.me()
    here = holder is not None and holder != me and holder.host == me.host
    if here and not flocked and holder.alive():  # of this job's id or not: it still runs, here
        raise MtError(_in_use(run_dir, holder))
    if holder is not None and holder != me and holder.earlier_run_of(me):
        log.warning(
            "%s: taking over the lock of PID %d on host %s, a run of %s before it was %s",
            path,
            holder.pid,
            holder.host,
            holder.job.replace("torchrun/", "torchrun job ", 1)
            if holder.job.startswith("torchrun/")
            else f"SLURM job {holder.job}",
            "requeued" if holder.restart < me.restart else "restarted by torchrun",
        )
    elif holder is not None and holder != me:
        if holder.host != me.host:  # flock may not reach that host: its word cannot be checked
            raise MtError(
                f"{_in_use(run_dir, holder)} (a lock from another host; "
                f"if no run is using this directory, delete {path})"
            )
        if not flocked and holder.alive():
            raise MtError(_in_use(run_dir, holder))
        # Same host and we hold the flock (or the PID is gone): its holder has died.
        log.warning(
            "%s: taking over the lock of PID %d, which no longer holds it", path, holder.pid
        )
    _write_holder(fd, me)


@contextlib.contextmanager
def _deciding(run_dir: Path) -> Iterator[None]:
    """Without flock, one process at a time reads and writes the lock file: the one that
    created RUN/lock.claim (O_EXCL: atomic on NFS and Lustre too); MtError for the others."""
    claim = run_dir / CLAIM_FILE
    fd = _open_claim(claim, run_dir)
    try:
        _write_holder(fd, Holder.me())  # who decides, should it die in these milliseconds
        yield
    finally:
        os.close(fd)
        claim.unlink(missing_ok=True)


def _open_claim(claim: Path, run_dir: Path) -> int:
    """Create `claim`, after removing one that a dead process of this host left."""
    flags, taking = os.O_WRONLY | os.O_CREAT | os.O_EXCL, _taking(run_dir, claim)
    try:
        return os.open(claim, flags, 0o666)
    except FileExistsError:
        if not _left_behind(claim):
            raise MtError(taking) from None
    claim.unlink(missing_ok=True)
    try:
        return os.open(claim, flags, 0o666)
    except FileExistsError:  # another process took it meanwhile
        raise MtError(taking) from None


def _left_behind(claim: Path) -> bool:
    """Whether `claim` is gone since, or names a process of this host that is no longer alive."""
    try:
        holder = _parse_holder(claim.read_text(encoding="utf-8", errors="replace"))
    except FileNotFoundError:  # its process has decided meanwhile
        return True
    return holder is not None and holder.host == socket.gethostname() and not holder.alive()


def _taking(run_dir: Path, claim: Path) -> str:
    """The one-line refusal while another process takes the run directory."""
    return (
        f"{run_dir}: another process is taking the run directory now (if none is, delete {claim})"
    )


@contextlib.contextmanager
def hold_run_lock(run_dir: Path) -> Iterator[Path]:
    """Hold RUN/lock for the block; MtError at once if another process holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        flocked = _flock(fd, run_dir)
        with contextlib.nullcontext() if flocked else _deciding(run_dir):
            _claim(fd, run_dir, path, flocked)
        try:
            yield path
        finally:
            if flocked or _read_holder(fd) == Holder.me():
                _write_holder(fd, None)  # a clean exit leaves the file empty: free
    finally:
        os.close(fd)  # drops the flock
