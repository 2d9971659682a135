"""Data-parallel training through torchrun on CPU (gloo, 2 processes, tiny model)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.waiting import read_until
from safetensors.torch import load_file

from mt import checkpoint as ckpt
from mt.config import load_config
from mt.metrics import read_metrics
from mt.train import train

pytestmark = pytest.mark.slow  # each test starts torchrun with two workers
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# 2 ranks vs 1 rank with update_freq 2 sum the same gradients in another order (the gradient
# all-reduce); after 8 Adam updates parameters agree to this absolute tolerance.
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(run_dir: Path, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.cache_dir={run_dir.parent / 'cache'}", *extra]


def torchrun(
    run_dir: Path, *extra: str, worker: str = "-m mt", env: dict | None = None
) -> subprocess.Popen:
    """Start `torchrun --nproc_per_node 2 ... train` on loopback."""
    args = [*TORCHRUN, "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *worker.split(), "train", "--config", str(TINY),
            *overrides(run_dir, "train.dist_timeout=20", *extra)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode()


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt.latest_checkpoint(run_dir).weights)


def test_two_ranks_equal_one_rank_with_update_freq_two(tmp_path: Path) -> None:
    # Whatever the number of batches in an epoch: an update takes the same batches either way.
    steps = ["train.max_steps=8", "train.log_every=1", "train.valid_every=4"]
    single = tmp_path / "single"
    train(load_config(TINY, overrides(single, *steps, "train.update_freq=2")))
    ddp = tmp_path / "ddp"
    code, err = finish(torchrun(ddp, *steps))
    assert code == 0, err
    a, b = weights(single), weights(ddp)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=TOLERANCE) for k in a)
    single_records, ddp_records = read_metrics(single, "train"), read_metrics(ddp, "train")
    assert [r["step"] for r in ddp_records] == list(range(1, 9))  # rank 0 alone writes metrics
    for r1, r2 in zip(single_records, ddp_records, strict=True):
        assert r1["tokens_per_update"] == r2["tokens_per_update"]  # the same data per update
        assert r1["loss"] == pytest.approx(r2["loss"], abs=1e-4)
    # Validation ran once per interval (rank 0 alone) and gives the single-process BLEU.
    valid1, valid2 = read_metrics(single, "valid"), read_metrics(ddp, "valid")
    assert [r["step"] for r in valid2] == [4, 8]
    assert [r["bleu"] for r in valid1] == pytest.approx([r["bleu"] for r in valid2], abs=1e-6)
    assert err.count("valid step 8") == 1
    # Rank 0 alone logs: the train, dev and test sets' encodings came from the cache.
    assert err.count("model: ") == 1 and err.count("reused the cached encoding") == 3


def test_resume_after_sigterm_to_torchrun_is_exact(tmp_path: Path) -> None:
    steps = ["train.max_steps=40", "train.log_every=1", "train.valid_every=1000"]
    straight = tmp_path / "straight"
    code, err = finish(torchrun(straight, *steps))
    assert code == 0, err
    split = tmp_path / "split"
    proc = torchrun(split, *steps)
    read_until(proc.stderr, "step 4 |")  # rank 0 logs every step
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
    code, err = finish(proc)
    assert code != 0
    stopped = ckpt.latest_checkpoint(split).step
    assert 4 <= stopped < 40, err
    code, err = finish(torchrun(split, *steps))
    assert code == 0, err
    a, b = weights(straight), weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = {r["step"]: r["loss"] for r in read_metrics(straight, "train")}
    assert {r["step"]: r["loss"] for r in read_metrics(split, "train")} == losses


def test_nan_on_one_rank_stops_every_rank_quickly(tmp_path: Path) -> None:
    proc = torchrun(tmp_path / "run", "train.max_steps=50", worker="tests/helpers/faulty_worker.py",
                    env={"MT_FAULT": "nan:1:3"})  # fmt: skip
    code, err = finish(proc)
    assert code != 0
    # Both ranks report the same decision at the same step.
    assert err.count("error: non-finite loss or gradient at step 3") == 2, err


def test_dead_rank_ends_the_job_within_the_timeout(tmp_path: Path) -> None:
    proc = torchrun(tmp_path / "run", "train.max_steps=50", worker="tests/helpers/faulty_worker.py",
                    env={"MT_FAULT": "die:1:3"})  # fmt: skip
    code, err = finish(proc)  # a hang until torch's 10-minute default timeout fails here
    assert code != 0
    assert "rank 1: dying on purpose" in err


def test_ranks_wait_for_a_preparation_longer_than_the_training_timeout(tmp_path: Path) -> None:
    # Rank 0 prepares (tokenizer, encoding) while rank 1 waits: that wait is on the start-up
    # group (dist_startup_timeout), not the training group, whose timeout is 8 s here.
    worker, slow = "tests/helpers/faulty_worker.py", {"MT_FAULT": "slow:0:12"}
    proc = torchrun(
        tmp_path / "run", "train.max_steps=2", "train.dist_timeout=8", worker=worker, env=slow
    )
    code, err = finish(proc)
    assert code == 0, err
    assert ckpt.latest_checkpoint(tmp_path / "run").step == 2


def test_out_of_memory_on_one_rank_skips_the_update_on_every_rank(tmp_path: Path) -> None:
    run = tmp_path / "run"
    worker = "tests/helpers/faulty_worker.py"
    proc = torchrun(run, "train.max_steps=6", worker=worker, env={"MT_FAULT": "oom:1:3"})
    code, err = finish(proc)
    assert code == 0, err
    assert err.count("step 3: a rank ran out of memory; every rank skipped this update") == 1
    assert ckpt.latest_checkpoint(run).step == 6  # both ranks went on, in step
    state = ckpt.load_state(ckpt.latest_checkpoint(run).state)
    assert state["train"]["oom_steps"] == 1


def test_out_of_memory_in_the_last_backward_skips_the_update_on_every_rank(tmp_path: Path) -> None:
    # With update_freq 1 the only backward is the last one: the failing rank must still join
    # the gradient sum, or the other would wait in it until the timeout.
    run = tmp_path / "run"
    worker = "tests/helpers/faulty_worker.py"
    proc = torchrun(run, "train.max_steps=6", worker=worker, env={"MT_FAULT": "oom_backward:1:3"})
    code, err = finish(proc)
    assert code == 0, err
    assert err.count("step 3: a rank ran out of memory; every rank skipped this update") == 1
    state = ckpt.load_state(ckpt.latest_checkpoint(run).state)
    assert state["train"]["step"] == 6 and state["train"]["oom_steps"] == 1
    assert state["optimizer"]["state"][0]["step"].item() == 6


def test_resume_on_one_rank_continues_a_two_rank_run_exactly(tmp_path: Path) -> None:
    # 2 ranks x update_freq 1 and 1 rank x update_freq 2 train on the same batches per update:
    # a run stopped on 2 ranks resumes on 1 where it stopped, and ends as if it had not moved.
    steps = ["train.max_steps=8", "train.log_every=1", "train.valid_every=4"]
    straight = tmp_path / "straight"
    code, err = finish(torchrun(straight, *steps))
    assert code == 0, err
    moved = tmp_path / "moved"
    code, err = finish(torchrun(moved, *steps[1:], "train.max_steps=4"))
    assert code == 0, err
    result = train(load_config(TINY, overrides(moved, *steps, "train.update_freq=2")))
    assert result.state.step == 8 and result.state.world_size == 1
    a, b = weights(straight), weights(moved)
    assert all(torch.allclose(a[k], b[k], atol=TOLERANCE) for k in a)
    first = read_metrics(straight, "train")
    second = read_metrics(moved, "train")
    assert [r["tokens_per_update"] for r in second] == [r["tokens_per_update"] for r in first]
    state_a = ckpt.load_state(ckpt.latest_checkpoint(straight).state)["train"]
    state_b = ckpt.load_state(ckpt.latest_checkpoint(moved).state)["train"]
    assert (state_a["epoch"], state_a["batches_done"]) == (
        state_b["epoch"],
        state_b["batches_done"],
    )
