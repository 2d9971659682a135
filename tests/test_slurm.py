"""scripts/slurm/train.sbatch under a fake `srun`/`scontrol` that behave like Slurm's: 2 ranks.

The fake srun does what the script relies on, as Slurm's srun does it (src/srun/srun_job.c,
`_srun_signal_mgr`): SIGTERM kills every task with SIGKILL, SIGUSR1 is relayed to every task.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.ports import free_port
from helpers.waiting import read_until

from mt import checkpoint as ckpt
from mt.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"

FAKE_SRUN = '''#!{python}
"""Slurm's srun on one node, as far as train.sbatch relies on it.

- --ntasks=N (else SLURM_NTASKS): N tasks with SLURM_PROCID = SLURM_LOCALID = i, SLURM_NTASKS.
- --cpus-per-task=C (or SRUN_CPUS_PER_TASK): each task bound to C CPUs, SLURM_CPUS_PER_TASK=C.
  Without it one CPU per task (since Slurm 22.05 srun ignores sbatch's --cpus-per-task), and
  the SLURM_CPUS_PER_TASK inherited from sbatch passes through unchanged.
- SIGTERM, SIGHUP, SIGQUIT: "forcing job termination", SIGKILL to every process of every task
  (Slurm kills the step's whole process tree); SIGUSR1 and SIGUSR2 are relayed to every task.
- --kill-on-bad-exit=1: a task that exits non-zero gets the others killed.
- --wait=S (else the site's WaitTime, FAKE_SLURM_WAIT_TIME, 0 by default): S seconds after the
  first task exits, the others are killed; 0 waits for them however long.
- Other options are dropped. Exit status: the highest of the tasks' (128 + signal if killed).
"""
import os, signal, subprocess, sys, threading

args, opts = sys.argv[1:], {{}}
while args and args[0].startswith("-"):
    name, _, value = args.pop(0).partition("=")
    if name in ("--ntasks", "--cpus-per-task", "--kill-on-bad-exit", "--wait"):
        opts[name] = value
wait_time = float(opts.get("--wait") or os.environ.get("FAKE_SLURM_WAIT_TIME", "0"))
ntasks = int(opts.get("--ntasks") or os.environ.get("SLURM_NTASKS", "1"))
cpus = opts.get("--cpus-per-task") or os.environ.get("SRUN_CPUS_PER_TASK")
allowed = sorted(os.sched_getaffinity(0))


def start(rank):
    env = {{**os.environ, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
           "SLURM_NTASKS": str(ntasks)}}
    if cpus:
        env["SLURM_CPUS_PER_TASK"] = cpus
    bound = {{allowed[(rank * int(cpus or 1) + j) % len(allowed)] for j in range(int(cpus or 1))}}
    return subprocess.Popen(args, env=env, preexec_fn=lambda: os.sched_setaffinity(0, bound))


def tree(pids):
    children = {{}}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{{entry}}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    todo, found = list(pids), []
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def kill_all(*_):
    print("srun: forcing job termination", file=sys.stderr, flush=True)
    for pid in tree([t.pid for t in tasks if t.poll() is None]):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def relay(signum, _):
    for t in tasks:
        if t.poll() is None:
            t.send_signal(signum)


tasks = [start(rank) for rank in range(ntasks)]
for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
    signal.signal(sig, kill_all)
for sig in (signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(sig, relay)
codes = []
while len(codes) < ntasks:
    _, status = os.wait()
    code = os.waitstatus_to_exitcode(status)
    codes.append(code if code >= 0 else 128 - code)
    if codes[-1] and opts.get("--kill-on-bad-exit", "0") == "1":
        kill_all()
    if len(codes) == 1 and wait_time > 0:
        threading.Timer(wait_time, kill_all).start()
os._exit(max(codes))  # a pending WaitTime timer ends with it
'''
FAKE_SCONTROL = """#!/bin/bash
case "$1" in
  show) echo localhost ;;
  requeue) echo "$2" >> "$FAKE_SLURM_REQUEUED" ;;
  *) exit 1 ;;
esac
"""
STEPS = ["train.max_steps=60", "train.log_every=1", "train.valid_every=1000"]
SHORT = ["train.max_steps=16", "train.log_every=1", "train.valid_every=1000"]


def fake_slurm(tmp_path: Path, cpus_per_task: int = 1) -> dict[str, str]:
    """The environment of a 2-task job on this machine, with the fake srun and scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN.format(python=sys.executable)),
                       ("scontrol", FAKE_SCONTROL)):  # fmt: skip
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    return {
        **env,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NNODES": "1",
        "SLURM_NTASKS": "2",
        "SLURM_CPUS_PER_TASK": str(cpus_per_task),  # what sbatch sets from --cpus-per-task
        "MASTER_PORT": str(port),
        "CONFIG": "configs/tiny.yaml",
        "PYTHON": sys.executable,
        "FAKE_SLURM_REQUEUED": str(tmp_path / "requeued"),
    }


def sbatch(env: dict[str, str], run_dir: Path, *extra: str) -> subprocess.Popen:
    args = ["bash", str(SBATCH), f"run_dir={run_dir}", f"data.cache_dir={run_dir}/cache",
            "train.dist_timeout=20", *extra]  # fmt: skip
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def stderr_until(proc: subprocess.Popen, text: str) -> str:
    """proc's stderr up to a line holding `text` (rank 0's log), read as it comes."""
    return read_until(proc.stderr, text).decode()


@pytest.mark.slow  # two jobs of two ranks
def test_sigusr1_checkpoints_requeues_and_the_next_job_resumes(tmp_path: Path) -> None:
    env = fake_slurm(tmp_path, cpus_per_task=2)
    # The requeued job trains to the end: 16 steps, enough to stop and resume in between.
    run = tmp_path / "run"
    proc = sbatch(env, run, *SHORT)
    seen = stderr_until(proc, "step 3 |")
    proc.send_signal(signal.SIGUSR1)  # what SLURM sends 300 s before the time limit
    _, rest = proc.communicate(timeout=120)
    err = seen + rest.decode()
    assert proc.returncode == 0, err
    assert (tmp_path / "requeued").read_text().split() == ["4242"]
    stopped = ckpt.latest_checkpoint(run).step
    assert 3 <= stopped < 16
    assert "checkpointing, then requeueing job 4242" in err
    # srun got --cpus-per-task: each rank may run on 2 CPUs and runs 2 intra-op threads.
    for rank in (0, 1):
        assert f"rank {rank} of 2 on cpu: 2 intra-op threads" in err

    # The requeued job: same command; one CPU per task (the threads were checked above, and
    # two ranks of two spinning OpenMP threads each oversubscribe a 2-core machine). The site
    # kills a step's tasks 0.1 s after its first ends (WaitTime): rank 1 ends at once, rank 0
    # goes on to average and write the report, which the script's srun --wait=0 lets it do.
    site = {"SLURM_CPUS_PER_TASK": "1", "FAKE_SLURM_WAIT_TIME": "0.1"}
    ends = ["train.average_last=2", "train.report=true"]  # rank 0 alone, after the others
    proc = sbatch({**env, **site}, run, *SHORT, *ends)
    _, err2 = proc.communicate(timeout=300)
    assert proc.returncode == 0, err2.decode()
    assert (run / "report.md").is_file() and (run / "checkpoints" / "average.safetensors").is_file()
    assert f"resumed from {run}/checkpoints/step-{stopped:08d}.safetensors" in err2.decode()
    assert ckpt.latest_checkpoint(run).step == 16
    steps_logged = [r["step"] for r in read_metrics(run, "train")]
    assert steps_logged == list(range(1, 17))  # nothing repeated, nothing lost


@pytest.mark.slow  # a job of two ranks
@pytest.mark.parametrize("sender", ["script", "ranks"])
def test_sigterm_checkpoints_and_stops(tmp_path: Path, sender: str) -> None:
    # `scancel --signal=TERM --batch` signals the script; `scancel --signal=TERM` the ranks.
    env = fake_slurm(tmp_path)
    run = tmp_path / "run"
    proc = sbatch(env, run, *STEPS)
    seen = stderr_until(proc, "step 3 |")
    if sender == "script":
        proc.send_signal(signal.SIGTERM)
    else:
        for pid in ranks_of(proc.pid):
            os.kill(pid, signal.SIGTERM)
    _, rest = proc.communicate(timeout=120)
    err = seen + rest.decode()
    assert proc.returncode == 128 + (signal.SIGUSR1 if sender == "script" else signal.SIGTERM)
    assert not (tmp_path / "requeued").exists()
    assert 3 <= ckpt.latest_checkpoint(run).step < 60, err
    assert "srun: forcing job termination" not in err


def ranks_of(script_pid: int) -> list[int]:
    """The `mt train` processes below the script (srun's tasks)."""
    ranks = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline[1:4] == [b"-m", b"mt", b"train"] and descends(int(entry), script_pid):
            ranks.append(int(entry))
    assert len(ranks) == 2
    return ranks


def descends(pid: int, ancestor: int) -> bool:
    """Whether `ancestor` is pid's parent, grandparent, ..."""
    while pid > 1:
        try:
            stat_line = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat_line.rsplit(")", 1)[1].split()[1])
        if pid == ancestor:
            return True
    return False


def test_no_head_node_stops_the_script_before_any_rank(tmp_path: Path) -> None:
    env = fake_slurm(tmp_path)
    (tmp_path / "bin" / "scontrol").write_text("#!/bin/bash\nexit 1\n")  # e.g. not on PATH
    proc = sbatch(env, tmp_path / "run")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.decode().splitlines() == [
        "mt-train: no head node: scontrol show hostnames $SLURM_JOB_NODELIST gave nothing"
    ]
    assert not (tmp_path / "run").exists()
