"""scripts/slurm/train.sbatch under a fake `srun`/`scontrol`: 2 local ranks, requeue on SIGUSR1."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.waiting import read_until

from mt import checkpoint as ckpt
from mt.metrics import read_metrics

pytestmark = pytest.mark.slow  # each test starts torchrun with two workers
ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"

FAKE_SRUN = """#!/bin/bash
# Like srun with one node: drop srun's own options, run the task in place.
while [[ "$1" == -* ]]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1" in
  show) echo localhost ;;
  requeue) echo "$2" >> "$FAKE_SLURM_REQUEUED" ;;
  *) exit 1 ;;
esac
"""


def fake_slurm(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NNODES": "1",
        "GPUS_PER_NODE": "2",
        "MASTER_PORT": str(port),
        "CONFIG": "configs/tiny.yaml",
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "FAKE_SLURM_REQUEUED": str(tmp_path / "requeued"),
    }


def sbatch(env: dict[str, str], run_dir: Path, *extra: str) -> subprocess.Popen:
    args = ["bash", str(SBATCH), f"run_dir={run_dir}", f"data.cache_dir={run_dir}/cache",
            "train.dist_timeout=20", *extra]  # fmt: skip
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sbatch_trains_to_a_checkpoint(tmp_path: Path) -> None:
    env = fake_slurm(tmp_path)
    proc = sbatch(env, tmp_path / "run", "train.max_steps=10")
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err.decode()
    assert ckpt.latest_checkpoint(tmp_path / "run").step == 10
    assert not (tmp_path / "requeued").exists()


def test_sigusr1_checkpoints_requeues_and_the_next_job_resumes(tmp_path: Path) -> None:
    env = fake_slurm(tmp_path)
    run = tmp_path / "run"
    steps = ["train.max_steps=60", "train.log_every=1", "train.valid_every=1000"]
    proc = sbatch(env, run, *steps)
    before = read_until(proc.stderr, "step 3 |")  # rank 0 logs every step
    proc.send_signal(signal.SIGUSR1)  # what SLURM sends 90 s before the time limit
    _, err = proc.communicate(timeout=120)
    err = before + err
    assert proc.returncode == 0, err.decode()
    assert (tmp_path / "requeued").read_text().split() == ["4242"]
    stopped = ckpt.latest_checkpoint(run).step
    assert 3 <= stopped < 60
    assert "checkpointing, then requeueing job 4242" in err.decode()

    proc = sbatch(env, run, *steps)  # the requeued job: same command
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err.decode()
    assert f"resumed from {run}/checkpoints/step-{stopped:08d}.safetensors" in err.decode()
    assert ckpt.latest_checkpoint(run).step == 60
    steps_logged = [r["step"] for r in read_metrics(run, "train")]
    assert steps_logged == list(range(1, 61))  # nothing repeated, nothing lost
