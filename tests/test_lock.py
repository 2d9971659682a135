"""Tests for mt.lock: one process per run directory, a dead holder's lock taken over."""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.processes import dead_pid

from mt import lock
from mt.errors import MtError
from mt.lock import LOCK_FILE, hold_run_lock

HOST = socket.gethostname()
# Holds the lock until its stdin closes; says so on stdout once it has it.
HOLDER = """
import sys
from mt.lock import hold_run_lock
with hold_run_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def start_holder(run: Path) -> subprocess.Popen:
    """A second process holding the run's lock (waited for on its stdout)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    return proc


def refusal(run: Path) -> str:
    """The message of the MtError that taking the lock raises."""
    with pytest.raises(MtError) as err, hold_run_lock(run):
        pass
    return str(err.value)


def named(pid: int, job: str = "") -> str:
    """The lock file's line for process `pid` of this host (in a SLURM job `job`)."""
    return f"pid {pid} host {HOST}{job} started {lock.start_time(pid)}\n"


def test_second_process_is_refused_and_clean_exit_frees(tmp_path: Path, caplog) -> None:
    run = tmp_path / "run"
    holder = start_holder(run)
    assert (run / LOCK_FILE).read_text() == named(holder.pid)
    assert refusal(run) == f"{run}: the run directory is in use by PID {holder.pid} on host {HOST}"
    holder.communicate("", timeout=60)  # closes stdin: the holder leaves its block and exits
    assert holder.returncode == 0
    assert (run / LOCK_FILE).read_text() == ""
    with caplog.at_level(logging.WARNING, logger="mt"), hold_run_lock(run) as path:
        assert path.read_text() == named(os.getpid())
    assert caplog.records == []  # a cleanly released lock is simply free


def test_lock_of_a_killed_holder_is_taken_over(tmp_path: Path, caplog) -> None:
    run = tmp_path / "run"
    holder = start_holder(run)
    line = named(holder.pid)
    holder.kill()  # SIGKILL: the kernel drops the flock; the file still names the holder
    holder.wait(timeout=60)
    assert (run / LOCK_FILE).read_text() == line
    with caplog.at_level(logging.WARNING, logger="mt"), hold_run_lock(run) as path:
        assert path.read_text() == named(os.getpid())
        assert refusal(run).endswith(f"in use by PID {os.getpid()} on host {HOST}")
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: taking over the lock of PID {holder.pid}, which no longer holds it"
    ]
    assert path.read_text() == ""


def test_lock_from_another_host_is_refused_with_advice(tmp_path: Path) -> None:
    path = tmp_path / LOCK_FILE
    path.write_text("pid 4242 host some-other-node\n")
    assert refusal(tmp_path) == (
        f"{tmp_path}: the run directory is in use by PID 4242 on host some-other-node "
        f"(a lock from another host; if no run is using this directory, delete {path})"
    )
    assert path.read_text() == "pid 4242 host some-other-node\n"  # never broken silently
    path.unlink()
    with hold_run_lock(tmp_path):
        pass


@pytest.fixture
def no_flock(monkeypatch) -> None:
    """A filesystem where flock is unsupported (Lustre without flock, some NFS mounts)."""

    def unsupported(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock.fcntl, "flock", unsupported)


def test_without_flock_a_live_holder_refuses(tmp_path: Path, no_flock) -> None:
    parent = os.getppid()  # alive: it is running these tests
    (tmp_path / LOCK_FILE).write_text(f"pid {parent} host {HOST}\n")
    assert (
        refusal(tmp_path)
        == f"{tmp_path}: the run directory is in use by PID {parent} on host {HOST}"
    )


def test_without_flock_a_pid_reused_by_another_process_is_taken_over(
    tmp_path: Path, no_flock, caplog
) -> None:
    parent = os.getppid()  # alive, but not the process that wrote the lock: it started later
    path = tmp_path / LOCK_FILE
    path.write_text(f"pid {parent} host {HOST} started {int(lock.start_time(parent)) - 1}\n")
    with caplog.at_level(logging.WARNING, logger="mt"), hold_run_lock(tmp_path):
        assert path.read_text() == named(os.getpid())
    assert f"taking over the lock of PID {parent}, which no longer holds it" in caplog.text
    path.write_text(named(parent))  # the very process: refused
    assert refusal(tmp_path).endswith(f"in use by PID {parent} on host {HOST}")


def test_without_flock_a_dead_holder_is_taken_over(tmp_path: Path, no_flock, caplog) -> None:
    pid = dead_pid()
    path = tmp_path / LOCK_FILE
    path.write_text(f"pid {pid} host {HOST}\n")
    with caplog.at_level(logging.WARNING, logger="mt"), hold_run_lock(tmp_path):
        assert path.read_text() == named(os.getpid())
    assert f"taking over the lock of PID {pid}, which no longer holds it" in caplog.text
    assert path.read_text() == ""


def test_without_flock_a_live_holder_of_the_same_job_id_refuses(
    tmp_path: Path, no_flock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another launch with the same rendezvous id, on this host, still training: torchrun's
    # restart of the refused launch must not take its lock because the id matches.
    parent = os.getppid()  # alive: it is running these tests
    (tmp_path / LOCK_FILE).write_text(f"pid {parent} host {HOST} job torchrun/r1 restart 0\n")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "r1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert (
        refusal(tmp_path)
        == f"{tmp_path}: the run directory is in use by PID {parent} on host {HOST}"
    )


def test_without_flock_one_process_at_a_time_decides_through_a_claim_file(
    tmp_path: Path, no_flock, caplog: pytest.LogCaptureFixture
) -> None:
    claim = tmp_path / lock.CLAIM_FILE
    with hold_run_lock(tmp_path):
        assert not claim.exists()  # made and removed while the lock file was read and written
    parent = os.getppid()  # alive: it is running these tests
    claim.write_text(f"pid {parent} host {HOST}\n")  # another process deciding right now
    taking = (
        f"{tmp_path}: another process is taking the run directory now (if none is, delete {claim})"
    )
    assert refusal(tmp_path) == taking
    claim.write_text("pid 4242 host node-a\n")  # another host's: its word cannot be checked
    assert refusal(tmp_path) == taking
    claim.write_text(f"pid {dead_pid()} host {HOST}\n")  # died while deciding, on this host
    with hold_run_lock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text() == named(os.getpid())
    assert not claim.exists()


def test_a_requeued_slurm_job_takes_over_its_earlier_runs_lock_from_another_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / LOCK_FILE
    earlier = "pid 4242 host node-a job 77 restart 0\n"  # killed with its node: no clean exit
    path.write_text(earlier)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the same run of the job: still refused
    assert refusal(tmp_path).startswith(f"{tmp_path}: the run directory is in use by PID 4242 on ")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued: SLURM ended the earlier run
    with caplog.at_level(logging.WARNING, logger="mt"), hold_run_lock(tmp_path):
        assert path.read_text() == named(os.getpid(), " job 77 restart 1")
    assert caplog.messages == [
        f"{path}: taking over the lock of PID 4242 on host node-a, a run of SLURM job 77 before "
        "it was requeued"
    ]
    path.write_text(earlier.replace("job 77", "job 78"))  # another job's lock stays refused
    assert "(a lock from another host;" in refusal(tmp_path)


def test_a_torchrun_restart_takes_over_its_earlier_workers_lock_from_another_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / LOCK_FILE
    path.write_text("pid 4242 host node-a job torchrun/r1 restart 0\n")  # rank 0 was on node-a
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "r1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # the same workers: still refused
    assert "(a lock from another host;" in refusal(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")  # torchrun stopped those workers
    with caplog.at_level(logging.WARNING, logger="mt"), hold_run_lock(tmp_path):
        assert path.read_text() == named(os.getpid(), " job torchrun/r1 restart 0.2")
    assert caplog.messages == [
        f"{path}: taking over the lock of PID 4242 on host node-a, a run of torchrun job r1 "
        "before it was restarted by torchrun"
    ]
    path.write_text("pid 4242 host node-a job torchrun/r1 restart 0.3\n")  # a later restart's
    assert "(a lock from another host;" in refusal(tmp_path)
    # torchrun's default rendezvous id names no job: a lock from another host stays refused.
    path.write_text("pid 4242 host node-a\n")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert "(a lock from another host;" in refusal(tmp_path)
    # In a SLURM job the job is SLURM's; a requeue starts torchrun's count anew.
    path.write_text("pid 4242 host node-a job 77 restart 0.3\n")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with hold_run_lock(tmp_path):
        assert path.read_text() == named(os.getpid(), " job 77 restart 1")


def test_a_lock_of_the_same_job_id_on_another_cluster_is_not_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / LOCK_FILE
    path.write_text("pid 4242 host node-a job alpha/77 restart 0\n")  # a live job elsewhere
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "beta")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert "(a lock from another host;" in refusal(tmp_path)
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "alpha")  # its own requeued job: taken over
    with hold_run_lock(tmp_path):
        assert (
            f" job alpha/77 restart 1 started {lock.start_time(os.getpid())}\n" in path.read_text()
        )
