"""Data-parallel training through torchrun on CPU (gloo, 2 processes, tiny model)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers.ports import free_port
from helpers.waiting import read_until
from safetensors.torch import load_file

import mt.train as train_module
from mt import checkpoint as ckpt
from mt import distributed
from mt.config import load_config
from mt.errors import MtError
from mt.metrics import read_metrics
from mt.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# 2 ranks vs 1 rank with update_freq 2 sum the same gradients in another order (the gradient
# all-reduce); after 8 Adam updates parameters agree to this absolute tolerance.
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def nccl_setting_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process's NCCL error setting as it was after each test: `distributed.setup` sets it
    in os.environ, which the children of later tests (torchrun, srun ranks) would inherit.
    monkeypatch undoes only what it recorded: set, then deleted, it records the variable."""
    name = distributed.NCCL_ERROR_HANDLING
    monkeypatch.setenv(name, os.environ.get(name, ""))
    if os.environ[name] == "":
        monkeypatch.delenv(name)


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


# With dropout: a batch gets the same dropout masks on whichever rank and micro-batch it falls.
EIGHT_STEPS = ["train.max_steps=8", "train.log_every=1", "train.valid_every=4", "model.dropout=0.1"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 2-rank run of EIGHT_STEPS: its directory and its stderr."""
    ddp = tmp_path_factory.mktemp("two_ranks") / "ddp"
    code, err = finish(torchrun(ddp, *EIGHT_STEPS))
    assert code == 0, err
    return ddp, err


@pytest.mark.slow  # starts torchrun with two workers (the fixture)
@pytest.mark.xdist_group("two_ranks")  # one worker builds the fixture once
def test_two_ranks_equal_one_rank_with_update_freq_two(
    two_ranks: tuple[Path, str], tmp_path: Path
) -> None:
    # Whatever the number of batches in an epoch: an update takes the same batches either way.
    single = tmp_path / "single"
    train(load_config(TINY, overrides(single, *EIGHT_STEPS, "train.update_freq=2")))
    ddp, err = two_ranks
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
    assert err.count("model: ") == 1 and err.count("train: kept") == 1  # rank 0 alone logs


@pytest.mark.slow  # starts torchrun with two workers (the fixture)
@pytest.mark.xdist_group("two_ranks")  # one worker builds the fixture once
def test_resume_after_sigterm_to_torchrun_is_exact(
    two_ranks: tuple[Path, str], tmp_path: Path
) -> None:
    straight, _ = two_ranks
    split = tmp_path / "split"
    proc = torchrun(split, *EIGHT_STEPS)
    read_until(proc.stderr, "step 2 |")  # rank 0 logs every step; validation at step 4
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
    code, err = finish(proc)
    assert code != 0
    stopped = ckpt.latest_checkpoint(split).step
    assert 2 <= stopped < 8, err
    code, err = finish(torchrun(split, *EIGHT_STEPS))
    assert code == 0, err
    a, b = weights(straight), weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = {r["step"]: r["loss"] for r in read_metrics(straight, "train")}
    assert {r["step"]: r["loss"] for r in read_metrics(split, "train")} == losses
    # A validation the signal put off at step 4 runs when the run resumes.
    bleu = {r["step"]: r["bleu"] for r in read_metrics(straight, "valid")}
    assert {r["step"]: r["bleu"] for r in read_metrics(split, "valid")} == bleu


@pytest.mark.slow  # starts torchrun with two workers
def test_nan_on_one_rank_stops_every_rank_quickly(tmp_path: Path) -> None:
    proc = torchrun(tmp_path / "run", "train.max_steps=50", worker="tests/helpers/faulty_worker.py",
                    env={"MT_FAULT": "nan:1:3"})  # fmt: skip
    code, err = finish(proc)
    assert code != 0
    # Both ranks report the same decision at the same step.
    assert err.count("error: non-finite loss or gradient at step 3") == 2, err


@pytest.mark.slow  # starts torchrun with two workers
def test_dead_rank_ends_the_job_within_the_timeout(tmp_path: Path) -> None:
    proc = torchrun(tmp_path / "run", "train.max_steps=50", worker="tests/helpers/faulty_worker.py",
                    env={"MT_FAULT": "die:1:3"})  # fmt: skip
    code, err = finish(proc)  # a hang until torch's 10-minute default timeout fails here
    assert code != 0
    assert "rank 1: dying on purpose" in err


@pytest.mark.slow  # starts torchrun with two workers
def test_ranks_wait_for_a_long_preparation_and_skip_an_out_of_memory_update_together(
    tmp_path: Path,
) -> None:
    # One launch, two faults of different phases.
    # Rank 0 prepares (tokenizer, encoding) for 10 s longer while rank 1 waits: that wait is on
    # the start-up group (dist_startup_timeout), not the training group, whose timeout is 8 s
    # (rank 1 waits the 10 s and rank 0's real preparation: longer than 8 s by seconds).
    # Then rank 1 runs out of memory in a forward pass, later rank 0 in the (last, only)
    # backward: the failing rank must still join the gradient sum, or the other would wait in it.
    run = tmp_path / "run"
    worker, faults = "tests/helpers/faulty_worker.py", "slow:0:10,oom:1:3,oom_backward:0:5"
    proc = torchrun(
        run, "train.max_steps=6", "train.dist_timeout=8", worker=worker, env={"MT_FAULT": faults}
    )
    code, err = finish(proc)
    assert code == 0, err
    for step in (3, 4):  # attempts 3 and 5: the skipped attempt 3 did not count as a step
        assert err.count(f"step {step}: a rank ran out of memory; every rank skipped") == 1
    state = ckpt.load_state(ckpt.latest_checkpoint(run).state)
    assert state["train"]["step"] == 6 and state["train"]["oom_steps"] == 2
    assert state["optimizer"]["state"][0]["step"].item() == 6  # both ranks went on, in step


@pytest.mark.slow  # starts torchrun with two workers
def test_ranks_agree_on_a_cooldown_begun_on_time(tmp_path: Path) -> None:
    # Rank 1's clock runs three times as fast: on its own it would begin the cool-down, and end
    # it, sooner than rank 0, leave the loop first and leave rank 0 waiting in a collective.
    run = tmp_path / "run"
    budget = [
        "train.max_steps=1000", "train.max_minutes=0.05", "train.cooldown=0.5",
        "train.valid_every=1000",
    ]  # fmt: skip
    worker, faults = "tests/helpers/faulty_worker.py", "clock:1:3"
    code, err = finish(torchrun(run, *budget, worker=worker, env={"MT_FAULT": faults}))
    assert code == 0, err
    [record] = read_metrics(run, "cooldown")
    state = ckpt.load_state(ckpt.latest_checkpoint(run).state)["train"]
    assert (state["cooldown_start"], state["cooldown_steps"]) == (record["step"], record["steps"])
    assert record["step"] <= state["step"] <= record["step"] + record["steps"]


def srun_ranks(
    args: list[list[str]], env: dict[str, str] | None = None, timeout: float = 120
) -> list[tuple[int, str]]:
    """Two `mt train` ranks launched as srun launches them (no torchrun agent to kill the
    others when one fails), rank r with args[r]: each one's exit status and stderr."""
    port = str(free_port())

    def rank(r: int) -> subprocess.Popen:
        ranks = {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2"}
        env_r = {**os.environ, **ranks, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                 "OMP_NUM_THREADS": "1", **(env or {})}  # fmt: skip
        worker = ["tests/helpers/faulty_worker.py"] if "MT_FAULT" in env_r else ["-m", "mt"]
        command = [sys.executable, *worker, "train", "--config", str(TINY)]
        return subprocess.Popen([*command, *args[r]], cwd=ROOT, env=env_r, stderr=subprocess.PIPE)

    procs = [rank(0), rank(1)]
    return [(p.communicate(timeout=timeout)[1].decode(), p.returncode)[::-1] for p in procs]


# Waits on the start-up group last up to train.dist_startup_timeout: 600 s, far over `timeout`.
SRUN = ["train.dist_timeout=20", "train.dist_startup_timeout=600"]


@pytest.mark.slow  # starts two Python ranks
def test_a_failure_of_rank_0_while_validating_stops_the_others_at_once(tmp_path: Path) -> None:
    # Rank 1 would wait for rank 0 in the validation's barrier until the start-up timeout.
    args = overrides(tmp_path / "run", "train.max_steps=20", "train.valid_every=4", *SRUN)
    (code0, err0), (code1, err1) = srun_ranks([args, args], {"MT_FAULT": "valid:0:2"})
    assert (code0, code1) == (1, 1)
    assert "validation on fire (injected)" in err0
    assert "valid step 4" in err0 and "valid step 8" not in err0
    assert err1.splitlines()[-1] == (
        "error: rank 1: rank 0 failed while validating or saving (see its error)"
    ), (err0, err1)


@pytest.mark.slow  # starts two Python ranks
def test_a_rank_that_fails_its_start_up_checks_stops_the_others_at_once(tmp_path: Path) -> None:
    # Rank 0 would wait for rank 1 in the preparation's collective until the start-up timeout.
    args = overrides(tmp_path / "run", *SRUN)
    (code0, err0), (code1, err1) = srun_ranks([args, args], {"MT_FAULT": "fits:1:1"})
    assert (code0, code1) == (1, 1), (err0, err1)
    assert err1.splitlines()[-1] == "error: the model does not fit (injected)"
    assert err0.splitlines()[-1] == (
        "error: rank 0: another rank failed while checking the run (see its error)"
    )
    assert not (tmp_path / "run" / "tokenizer").exists()  # nothing of the run began


@pytest.mark.slow  # starts two Python ranks
def test_a_failure_of_rank_0_to_write_the_last_checkpoint_fails_every_rank(tmp_path: Path) -> None:
    # The run ends on train.max_minutes, between validations: rank 0 writes its last checkpoint
    # alone. The others used to exit as if it were written (status 138 after a signal, which
    # the Slurm script answers by requeueing the job).
    budget = ["train.max_steps=100000", "train.max_minutes=0.02", "train.valid_every=100000"]
    args = overrides(tmp_path / "run", *budget, *SRUN)
    (code0, err0), (code1, err1) = srun_ranks([args, args], {"MT_FAULT": "save:0:1"})
    assert (code0, code1) == (1, 1), (err0, err1)
    assert "No space left on device (injected)" in err0.splitlines()[-1]
    assert err1.splitlines()[-1] == (
        "error: rank 1: another rank failed while writing the last checkpoint (see its error)"
    ), (err0, err1)


@pytest.mark.slow  # starts two Python ranks
def test_ranks_agree_on_early_stopping_when_the_best_is_chosen_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Saved at step 20: best 30.0 (step 5), three validations since. With step 5 deleted and a
    # new data.select_direction, rank 0 chooses step 15 (20.0), one validation ago; rank 1 kept
    # three, stopped early (train.patience=2) and left rank 0 waiting for it.
    bleus = iter([30.0, 10.0, 20.0, 15.0])
    scores = {"loss": 1.0, "nll": 1.0, "ppl": 2.7}
    monkeypatch.setattr(train_module, "validate", lambda run: {**scores, "bleu": next(bleus)})
    run = tmp_path / "run"
    every = ["train.valid_every=5", "train.keep_last=5"]
    train(load_config(TINY, overrides(run, "train.max_steps=20", *every)))
    for path in (run / "checkpoints").glob("step-00000005.*"):
        path.unlink()
    args = overrides(
        run, "train.max_steps=40", *every, "train.patience=2", "data.select_direction=de-en", *SRUN
    )
    (code0, err0), (code1, err1) = srun_ranks([args, args])
    assert (code0, code1) == (0, 0), (err0, err1)
    steps = [r["step"] for r in read_metrics(run, "valid")]
    assert steps[:4] == [5, 10, 15, 20] and len(steps) in (5, 6, 7)  # trained on, together


@pytest.mark.slow  # starts two Python ranks
def test_ranks_that_would_start_from_different_steps_stop(tmp_path: Path) -> None:
    # Node-local run directories: rank 0's holds a checkpoint at step 4, rank 1's nothing.
    shared = tmp_path / "shared"
    train(load_config(TINY, overrides(shared, "train.max_steps=4", "train.valid_every=4")))
    local = tmp_path / "local"  # the same tokenizer: the ranks' models have the same shapes
    shutil.copytree(shared, local, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl"))
    (code0, err0), (code1, err1) = srun_ranks(
        [
            overrides(shared, "train.max_steps=8", *SRUN),
            overrides(local, "train.max_steps=8", *SRUN),
        ]
    )
    assert (code0, code1) == (1, 1)
    for rank, (err, step) in enumerate(((err0, 4), (err1, 0))):
        assert err.splitlines()[-1] == (
            f"error: rank {rank}: the ranks start from different steps (0 to 4; this one "
            f"{step}): train.run_dir must be on storage that every node shares"
        )


@pytest.mark.slow  # starts two Python ranks
def test_ranks_that_read_different_training_data_stop(tmp_path: Path) -> None:
    # Node-local copies of the corpus, one of them cut short: the ranks would plan other batches.
    cut = tmp_path / "cut"
    cut.mkdir()
    for lang in ("de", "en"):
        lines = (ROOT / f"tests/data/tiny/train.{lang}").read_text(encoding="utf-8").splitlines()
        (cut / f"train.{lang}").write_text("\n".join(lines[:400]) + "\n", encoding="utf-8")
    args = overrides(tmp_path / "run", "train.max_steps=4", *SRUN)
    (code0, err0), (code1, err1) = srun_ranks([args, [*args, f"data.train={cut / 'train'}"]])
    assert (code0, code1) == (1, 1), (err0, err1)
    for rank, err in enumerate((err0, err1)):
        last = err.splitlines()[-1]
        assert last.startswith(f"error: rank {rank}: the ranks read different training data (")
        assert last.endswith("): the training corpora must hold the same data on every node")
    assert "(this one 400 pairs, " in err1.splitlines()[-1]


# Two ranks of a bare `distributed.setup` + `main_first`; rank 0's preparation fails with an
# error that is not an MtError, or is stopped as the CLI stops it on SIGTERM or SIGUSR1
# (SystemExit). Rank 0 then stays alive until its stdin closes, as a rank whose death NCCL
# would not notice before the start-up timeout.
ONE_RANK_FAILS = """
import os, sys
from mt import distributed
from mt.errors import MtError

world, device = distributed.setup("cpu", 20, 600)
failing = world.rank == int(os.environ["FAILING"])

def prepare():
    if failing and os.environ["FAILURE"] == "signal":
        raise SystemExit(138)  # mt.cli's handler of SIGUSR1, outside the training loop
    if failing:
        raise RuntimeError("the corpus is on fire")
    return "prepared"

try:
    distributed.main_first(world, device, prepare)
    distributed.all_reduce(world, [0.0], device, startup=True)  # as the run's next step
except MtError as exc:
    sys.exit(f"error: {exc}")
except (RuntimeError, SystemExit) as exc:
    print(f"rank {world.rank}: {exc}", file=sys.stderr, flush=True)
    sys.stdin.read()  # alive, as a rank that NCCL would not notice dead
    sys.exit(1)
finally:
    distributed.teardown(world)  # as `train` does: exiting with the groups alive may abort
"""


@pytest.mark.slow  # starts two Python ranks
@pytest.mark.parametrize("failure", ["error", "signal"])
@pytest.mark.parametrize(
    ("failing", "doing"), [(0, "preparing the run"), (1, "loading the prepared run")]
)
def test_a_failure_of_one_rank_while_preparing_stops_the_other_at_once(
    failure: str, failing: int, doing: str
) -> None:
    port = str(free_port())

    def rank(r: int) -> subprocess.Popen:
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
               "FAILURE": failure, "FAILING": str(failing)}  # fmt: skip
        pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return subprocess.Popen([sys.executable, "-c", ONE_RANK_FAILS], cwd=ROOT, env=env, **pipes)

    procs = [rank(0), rank(1)]
    other = 1 - failing
    try:
        _, err = procs[other].communicate(timeout=120)  # far below the start-up timeout, 600 s
    finally:
        _, err_failing = procs[failing].communicate(timeout=60)  # closes its stdin: it exits
    assert procs[other].returncode == 1
    assert err.decode().splitlines() == [
        f"error: rank {other}: another rank failed while {doing} (see its error)"
    ]
    expected = "138" if failure == "signal" else "the corpus is on fire"
    assert f"rank {failing}: {expected}" in err_failing.decode()


def test_setup_makes_nccl_errors_raise_before_creating_process_groups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = []

    def init_process_group(*args: object, **kwargs: object) -> None:
        seen.append(os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING"))
        raise InterruptedError  # stop before any network

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # as torchrun sets them
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    with pytest.raises(InterruptedError):
        distributed.setup("cpu", 20, 60)
    assert seen == ["2"]


@pytest.mark.parametrize(
    ("value", "torchrun", "want"),
    [(None, False, "2"), (None, True, "2"), ("1", True, "2"), ("1", False, "1"), ("3", True, "3"),
     ("0", False, "0")],
)  # fmt: skip
def test_nccl_error_handling_keeps_what_the_user_set(
    monkeypatch: pytest.MonkeyPatch, value: str | None, torchrun: bool, want: str
) -> None:
    for name, setting in (("TORCH_NCCL_ASYNC_ERROR_HANDLING", value),
                          ("TORCHELASTIC_RUN_ID", "job" if torchrun else None)):  # fmt: skip
        if setting is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, setting)
    distributed.nccl_errors_raise()
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == want


class TimedOutWork:
    """A collective whose wait times out, as an NCCL one does with a timeout given."""

    def __init__(self) -> None:
        self.timeouts: list[float] = []

    def wait(self, timeout: timedelta) -> bool:
        self.timeouts.append(timeout.total_seconds())
        raise dist.DistBackendError("Work ran for 20000 milliseconds before timing out.")


def test_guarded_collectives_wait_within_their_group_timeout() -> None:
    world = distributed.World(rank=1, world_size=2, timeout_s=20.0, startup_timeout_s=90.0)
    work = TimedOutWork()
    for startup in (False, True):
        with pytest.raises(MtError) as raised:
            distributed.guarded(world, lambda: work, startup)
        assert str(raised.value) == (
            "rank 1 of 2: lost contact with the other ranks (a rank died or timed out): "
            "Work ran for 20000 milliseconds before timing out."
        )
    assert work.timeouts == [20.0, 90.0]


@pytest.mark.parametrize(
    ("slurm_cpus", "omp", "want"),
    [("1", None, 1), ("99", None, len(os.sched_getaffinity(0))), ("1", "2", None),
     (None, None, None)],
)  # fmt: skip
def test_ranks_run_one_thread_per_cpu_slurm_gave_them(
    monkeypatch: pytest.MonkeyPatch, slurm_cpus: str | None, omp: str | None, want: int | None
) -> None:
    for name, value in (("SLURM_CPUS_PER_TASK", slurm_cpus), ("OMP_NUM_THREADS", omp)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        distributed.set_cpu_threads()
        assert torch.get_num_threads() == (want or 3)  # OMP_NUM_THREADS or no Slurm: untouched
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow  # starts torchrun with two workers (the fixture)
@pytest.mark.xdist_group("two_ranks")  # one worker builds the fixture once
def test_resume_on_one_rank_continues_a_two_rank_run_exactly(
    two_ranks: tuple[Path, str], tmp_path: Path
) -> None:
    # 2 ranks x update_freq 1 and 1 rank x update_freq 2 train on the same batches per update:
    # a run stopped on 2 ranks resumes on 1 where it stopped, and ends as if it had not moved.
    # The 2-rank run's step-4 checkpoint (validated, kept: keep_last=2) is where it stopped.
    straight, _ = two_ranks
    moved = tmp_path / "moved"
    shutil.copytree(straight, moved, ignore=shutil.ignore_patterns("tensorboard"))
    at_4 = moved / "checkpoints" / "step-00000004.safetensors"
    config = load_config(TINY, overrides(moved, *EIGHT_STEPS, "train.update_freq=2"))
    result = train(config, resume=at_4)
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


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "2"}, "RANK is not set, but WORLD_SIZE is (start with torchrun)"),
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "1"},
         "WORLD_SIZE=2 but MASTER_ADDR is not set (start with torchrun)"),
    ],
)  # fmt: skip
def test_a_launch_environment_that_cannot_work_is_one_line(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    launched(monkeypatch, **env)
    with pytest.raises(MtError) as err:
        distributed.setup("cpu", 10, 10)
    assert str(err.value) == message


def launched(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    """This process as a launcher would start a rank: WORLD_SIZE, RANK, MASTER_ADDR and more."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.mark.slow  # a second or more: the full suite runs it
def test_a_peer_that_never_joins_is_one_line_after_the_startup_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    launched(monkeypatch, WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with pytest.raises(MtError) as err:
        distributed.setup("cpu", 10, 1)
    assert str(err.value).startswith(
        f"rank 0: cannot join the 2 ranks at 127.0.0.1:{port} (train.dist_startup_timeout=1): "
    )
    assert not torch.distributed.is_initialized()


def test_a_mesh_that_cannot_connect_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    launched(monkeypatch, WORLD_SIZE="2", RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29677")

    def refused(*args: object, **kwargs: object) -> None:  # as gloo says it, after a restart
        raise RuntimeError("Gloo connectFullMesh failed with [...] Connection refused\nmore")

    monkeypatch.setattr(torch.distributed, "init_process_group", refused)
    with pytest.raises(MtError) as err:
        distributed.setup("cpu", 10, 30)
    assert str(err.value) == (
        "rank 1: cannot join the 2 ranks at 127.0.0.1:29677 (train.dist_startup_timeout=30): "
        "Gloo connectFullMesh failed with [...] Connection refused"
    )


def test_srun_tasks_without_a_world_size_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")  # `srun --ntasks 2 mt train`, no script
    with pytest.raises(MtError) as err:
        distributed.setup("cpu", 10, 30)
    assert str(err.value) == (
        "srun started 2 tasks but WORLD_SIZE is not set: run them with scripts/slurm/train.sbatch "
        "(or torchrun)"
    )


def test_more_ranks_on_a_node_than_its_gpus_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    launched(monkeypatch, WORLD_SIZE="8", RANK="3", LOCAL_RANK="3", MASTER_ADDR="127.0.0.1",
             MASTER_PORT="29677")  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(MtError) as err:
        distributed.setup("cuda", 10, 30)
    assert str(err.value) == (
        "rank 3: LOCAL_RANK=3 but this node shows 2 GPUs: start one rank per GPU (e.g. "
        "--ntasks-per-node equal to --gpus-per-node)"
    )
