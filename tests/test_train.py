"""The training loop on the tiny config: checkpoints, metrics, exact resume, bad states."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sacrebleu
import torch
from helpers.waiting import read_until
from safetensors.torch import load_file
from typer.testing import CliRunner

import mt.device as device_module
import mt.train as train_module
from mt import checkpoint as ckpt
from mt import rundir as rundir_module
from mt.average import select_last
from mt.batching import collate
from mt.cli import app as cli_app
from mt.config import Config, load_config
from mt.corpora import open_corpus
from mt.device import describe_precision, machine_kind
from mt.distributed import World
from mt.errors import ConfigError, MtError
from mt.finish import finish
from mt.lock import hold_run_lock
from mt.loss import label_smoothed_nll
from mt.metrics import read_metrics
from mt.report import _training_section, write_report
from mt.rundir import model_checkpoint
from mt.search import Hypothesis
from mt.tokenizer import Tokenizer, load_tokenizer
from mt.train import TrainResult, TrainState, dev_references, expected_end, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def tiny(run_dir: Path, *overrides: str) -> Config:
    """The tiny config writing to run_dir, with a shared encoded-data cache."""
    cache = run_dir.parent / "cache"
    return load_config(TINY, [f"run_dir={run_dir}", f"data.cache_dir={cache}", *overrides])


def warned(
    caplog: pytest.LogCaptureFixture, prefix: str, config: Config, resume: Path | None = None
) -> list[str]:
    """The messages starting with `prefix` that one training run logs."""
    caplog.clear()
    train(config, resume=resume)
    return [m for m in caplog.messages if m.startswith(prefix)]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = ckpt.latest_checkpoint(run_dir)
    assert latest is not None
    return load_file(latest.weights)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}


def sigterm_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """SIGTERM to this process once the training loop has logged `step` (a window ending there:
    train.log_every must divide it); the run stops at its next step boundary."""
    log_window = train_module.log_window

    def signalled(run: Any, bar: object) -> None:
        log_window(run, bar)
        if run.state.step == step:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train_module, "log_window", signalled)


def sigterm_while_validating(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM to this process during the run's first validation (the scheduler's notice)."""
    validate_direction, sent = train_module.validate_direction, []

    def signalled(run: object, dev: object) -> dict[str, float]:
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return validate_direction(run, dev)

    monkeypatch.setattr(train_module, "validate_direction", signalled)


@pytest.mark.slow
def test_tiny_run_writes_a_complete_run_directory(tmp_path: Path) -> None:
    result = train(tiny(tmp_path / "run", "train.max_steps=30"))
    run = tmp_path / "run"
    assert result.state.step == 30 and result.signum is None
    assert (run / "config.yaml").exists()
    assert load_config(run / "config.yaml") == tiny(run, "train.max_steps=30")
    assert (run / "tokenizer" / "spm.model").exists()
    assert [c.step for c in ckpt.list_checkpoints(run)] == [15, 30]
    assert ckpt.best_checkpoint(run) is not None
    train_records = read_metrics(run, "train")
    assert [r["step"] for r in train_records] == [10, 20, 30]
    valid = read_metrics(run, "valid")
    assert [r["step"] for r in valid] == [15, 30]
    assert valid[1]["loss"] < valid[0]["loss"]  # dev loss falls
    assert all(0 <= r["bleu"] <= 100 and r["seconds"] >= 0 for r in valid)
    assert list((run / "tensorboard").iterdir())


def test_learning_rate_follows_the_schedule(tmp_path: Path) -> None:
    train(tiny(tmp_path / "run", "train.max_steps=20", "train.log_every=1"))
    records = read_metrics(tmp_path / "run", "train")
    assert [r["step"] for r in records] == list(range(1, 21))
    # tiny.yaml: lr 3e-3, warm-up 5. The lr logged after update n is the one update n used.
    for r in records:
        n = r["step"]
        expected = 3e-3 * n / 5 if n < 5 else 3e-3 * (5 / n) ** 0.5
        assert r["lr"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow  # a second or more: the full suite runs it
def test_cooldown_takes_the_lr_to_zero_over_the_last_steps(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="mt")
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=20", "train.log_every=1", "train.cooldown=0.25"))
    lrs = {r["step"]: r["lr"] for r in read_metrics(run, "train")}
    # tiny.yaml: lr 3e-3, warm-up 5; 20 steps x 0.25: updates 16-20 cool down, from update 15's lr.
    at_15 = 3e-3 * (5 / 15) ** 0.5
    assert lrs[15] == pytest.approx(at_15, rel=1e-9)  # (the lr update 15 used)
    assert [lrs[s] / at_15 for s in range(15, 21)] == pytest.approx(
        [1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]
    )
    [record] = read_metrics(run, "cooldown")
    assert (record["step"], record["steps"]) == (15, 5)
    assert record["lr"] == pytest.approx(at_15, rel=1e-9)
    assert "lr cool-down: from 1.73e-03 after update 15 to 0 over the next 5 updates" in caplog.text
    assert "over the last 25% of train.max_steps=20\n" in caplog.text
    write_report(run, test=False)
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "- lr cool-down after step 15: from 1.73e-03 to 0 over 5 updates\n" in report


def test_cooldown_resume_inside_it_is_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logged = ["train.max_steps=12", "train.log_every=1", "train.cooldown=0.5"]  # from update 7
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny(straight, *logged))
    real, calls = train_module.train_step, itertools.count(1)

    def signalled_at_9(*args: object) -> object:
        learner, batches, tokens, stop, late, seconds, *_ = args
        return real(learner, batches, tokens, stop or next(calls) == 9, late, seconds)

    monkeypatch.setattr(train_module, "train_step", signalled_at_9)
    assert train(tiny(split, *logged)).state.step == 9
    monkeypatch.undo()
    train(tiny(split, *logged))
    assert identical(weights(split), weights(straight))
    assert losses(split) == losses(straight)
    begun = [
        [(r["step"], r["steps"], r["lr"]) for r in read_metrics(run, "cooldown")]
        for run in (split, straight)
    ]
    assert begun[0] == begun[1] == [(6, 6, pytest.approx(3e-3 * (5 / 6) ** 0.5))]


def test_cooldown_due_by_steps_and_by_minutes() -> None:
    due = train_module.cooldown_due
    steps = load_config(TINY, ["train.max_steps=100", "train.cooldown=0.2"]).train
    assert due(steps, TrainState(step=78), 0.0) == 0
    assert due(steps, TrainState(step=79), 0.0) == 20  # updates 81-100
    assert due(steps, TrainState(step=79, cooldown_start=50, cooldown_steps=50), 0.0) == 0
    assert due(steps, TrainState(step=99), 0.0) == 0  # the last update: nothing left to cool
    timed = load_config(
        TINY, ["train.max_steps=1000", "train.max_minutes=10", "train.cooldown=0.25"]
    ).train
    assert due(timed, TrainState(step=89), 449.9) == 0
    # 150 of 600 seconds left at 90 updates in 450 s: 30 more updates.
    assert due(timed, TrainState(step=89), 450.0) == 30
    assert due(timed, TrainState(step=799), 450.0) == 200  # max_steps comes first
    off = load_config(TINY, ["train.max_steps=100"]).train
    assert due(off, TrainState(step=99), 1e9) == 0
    # Started from another run's step 20,000: the rate is of the updates this run has timed.
    on = load_config(
        TINY, ["train.max_steps=100000", "train.max_minutes=10", "train.cooldown=0.25"]
    ).train
    assert due(on, TrainState(step=20089, clock_step=20000), 450.0) == 30


def test_update_freq_two_equals_double_batch(tmp_path: Path) -> None:
    # Two micro-batches per update give the tokens of both in `tokens_per_update`.
    train(tiny(tmp_path / "a", "train.max_steps=4", "train.log_every=1", "train.update_freq=2"))
    train(tiny(tmp_path / "b", "train.max_steps=8", "train.log_every=1"))
    a = read_metrics(tmp_path / "a", "train")
    b = read_metrics(tmp_path / "b", "train")
    assert (len(a), len(b)) == (4, 8)
    for i, record in enumerate(a):
        assert (
            record["tokens_per_update"]
            == b[2 * i]["tokens_per_update"] + b[2 * i + 1]["tokens_per_update"]
        )


def run_cli(run_dir: Path, *overrides: str) -> subprocess.Popen:
    cache = run_dir.parent / "cache"
    args = [sys.executable, "-m", "mt", "train", "--config", str(TINY), f"run_dir={run_dir}",
            f"data.cache_dir={cache}", *overrides]  # fmt: skip
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_step(proc: subprocess.Popen, step: int) -> bytes:
    """Wait until the run logs `step` (train.log_every=1): its stderr so far."""
    return read_until(proc.stderr, f"step {step} |")


# log_every 3: the stop may fall inside a logging window, which the checkpoint keeps.
RESUMED_STEPS = ["train.max_steps=60", "train.log_every=3", "train.valid_every=20"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of RESUMED_STEPS without interruption, which each resumed run must equal."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(tiny(run, *RESUMED_STEPS))
    return run


@pytest.mark.slow
@pytest.mark.xdist_group("straight")  # one worker trains the `straight` fixture once
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_resume_after_signal_is_exact(straight: Path, tmp_path: Path, sig: int, code: int) -> None:
    split = tmp_path / "split"
    proc = run_cli(split, *RESUMED_STEPS)
    before = wait_for_step(proc, 3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    err = before + err
    assert proc.returncode == code, err.decode()
    assert "run the same command to resume" in err.decode()
    assert b"Traceback" not in err
    latest = ckpt.latest_checkpoint(split)
    assert 3 <= latest.step < 60
    assert ckpt.load_state(latest.state)["train"]["step"] == latest.step

    result = train(tiny(split, *RESUMED_STEPS))  # resumes from the latest checkpoint
    assert result.state.step == 60
    # Every record, before and after the stop (losses, validations), and one end record.
    assert records(split) == records(straight)
    assert [r["kind"] for r in read_metrics(split)].count("end") == 1
    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical on CPU


@pytest.mark.slow
@pytest.mark.xdist_group("straight")
def test_a_signal_during_a_validation_stops_at_its_step(
    straight: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    split = tmp_path / "split"
    sigterm_while_validating(monkeypatch)  # the first validation's: at step 20
    result = train(tiny(split, *RESUMED_STEPS))
    monkeypatch.undo()
    # The validated step's checkpoint is the signal's: no update and no checkpoint more.
    assert (result.signum, result.state.step) == (signal.SIGTERM, 20)
    assert [c.step for c in ckpt.list_checkpoints(split)] == [20]
    assert train(tiny(split, *RESUMED_STEPS)).state.step == 60
    assert records(split) == records(straight)
    assert identical(weights(split), weights(straight))


def test_run_past_max_steps_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    train(tiny(tmp_path / "run", "train.max_steps=15"))
    caplog.set_level("INFO", logger="mt")
    result = train(tiny(tmp_path / "run", "train.max_steps=15"))
    assert result.state.step == 15
    assert "is already at step 15 (train.max_steps=15): nothing to do" in caplog.text


@pytest.mark.slow
def test_changed_model_is_refused_on_resume(tmp_path: Path) -> None:
    train(tiny(tmp_path / "run", "train.max_steps=15"))
    with pytest.raises(ConfigError) as err:
        train(tiny(tmp_path / "run", "train.max_steps=30", "model.ffn_dim=128"))
    assert str(err.value) == (
        f"{tmp_path / 'run' / 'config.yaml'}: the run was started with other settings "
        "(model.ffn_dim: 64 -> 128); use a new run_dir, or restore those settings to resume"
    )
    # Training settings may change: this continues the run.
    assert train(tiny(tmp_path / "run", "train.max_steps=20")).state.step == 20


@pytest.mark.slow
def test_changed_tokenizer_is_refused_on_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=15"))
    other = tmp_path / "other"
    train(tiny(other, "train.max_steps=1", "train.seed=2", "data.train=tests/data/tiny/valid"))
    (run / "tokenizer" / "spm.model").write_bytes((other / "tokenizer" / "spm.model").read_bytes())
    with pytest.raises(MtError, match=r"tokenizer differs from the run's"):
        train(tiny(run, "train.max_steps=30"))


@pytest.mark.slow
def test_changed_training_text_warns_on_resume_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for suffix in ("de", "en"):
        shutil.copy(ROOT / f"tests/data/tiny/train.{suffix}", tmp_path / f"train.{suffix}")
    run = tmp_path / "run"

    def resume(steps: int) -> list[str]:
        config = tiny(run, f"train.max_steps={steps}", f"data.train={tmp_path / 'train'}")
        return warned(caplog, "warning: data.train", config)

    assert resume(6) == []
    assert resume(8) == []
    lines = (tmp_path / "train.en").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "train.en").write_text("".join([lines[1], *lines[1:]]), encoding="utf-8")
    assert resume(10) == [
        "warning: data.train: the training text changed since step 8 was saved; training goes "
        "on with the new text, in other batches than an uninterrupted run's"
    ]
    assert resume(12) == []  # the checkpoints now hold the new text's fingerprint


@pytest.mark.slow
def test_a_run_started_from_another_runs_checkpoint_has_its_own_best(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Saved at step 120 with the logging window of updates 101-120 (train.log_every=50).
    every = ("train.max_steps=120", "train.valid_every=120", "train.log_every=50")
    first = train(tiny(tmp_path / "first", *every))
    start = ckpt.latest_checkpoint(tmp_path / "first")
    assert start is not None
    second = tmp_path / "second"
    windows = []
    real_log_window = train_module.log_window
    monkeypatch.setattr(
        train_module,
        "log_window",
        lambda run, bar: (windows.append(run.window["steps"]), real_log_window(run, bar)),
    )
    # Outputs of one piece score far below the first run's best: a best carried over from it
    # would never let this run have a best checkpoint of its own.
    short = ["decode.max_len_a=0", "decode.max_len_b=1"]
    result = train(
        tiny(second, "train.max_steps=130", "train.valid_every=10", *short), start.weights
    )
    valid = read_metrics(second, "valid")
    assert [r["step"] for r in valid] == [130]
    assert result.state.best_bleu == valid[0]["bleu"] < first.state.best_bleu
    best = ckpt.best_checkpoint(second)
    assert best is not None and best.step == 130
    # Its first log line is of its own 10 updates, not also of the first run's last 20; its
    # clock (train.max_minutes, the cool-down's rate) times the updates from step 120.
    assert windows[0] == 10
    assert result.state.clock_step == 120
    # Its report tells its own steps, which its time is of, from the other run's.
    (line,) = [line for line in _training_section(second, "") if " steps (" in line]
    assert line.startswith("- 130 steps (")
    assert " epochs; the last 10 in this run, from another run's step 120) in " in line


@pytest.mark.slow
def test_a_dev_set_the_tokenizer_cannot_spell_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tiny_dir = ROOT / "tests" / "data" / "tiny"
    shutil.copy(tiny_dir / "valid.en", tmp_path / "valid.en")
    lines = (tiny_dir / "valid.de").read_text(encoding="utf-8").splitlines()
    greek = ["Ο σκύλος βλέπει τη γάτα ." if i % 2 else line for i, line in enumerate(lines)]
    (tmp_path / "valid.de").write_text("".join(f"{line}\n" for line in greek), encoding="utf-8")
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=1", f"data.valid={tmp_path / 'valid'}"))  # no byte pieces
    src, tgt = json.loads((run / "data.json").read_text())["directions"]["de-en"]["valid_unk_rate"]
    assert src > 0.1 and tgt == 0
    warnings = [m for m in caplog.messages if m.startswith("warning: valid")]
    assert warnings == [
        f"warning: valid: {src:.1%} of the source pieces are unknown to the tokenizer (was it "
        f"trained without that language? delete {run / 'tokenizer'} to retrain it)"
    ]


@pytest.mark.slow
def test_resuming_an_earlier_checkpoint_warns_of_the_later_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=30"))  # checkpoints at 15 and 30
    earlier = run / "checkpoints" / "step-00000015.safetensors"
    result = train(tiny(run, "train.max_steps=20", "train.keep_last=1"), resume=earlier)
    assert result.state.step == 20
    assert [m for m in caplog.messages if m.startswith("warning: --resume")] == [
        "warning: --resume step-00000015 goes back; the run's later checkpoints (step-00000030) "
        "stay, and a run without --resume continues from the latest: delete them to abandon them"
    ]
    # Pruning keeps the last of the run's own checkpoints, not of those it went back from.
    assert [c.step for c in ckpt.list_checkpoints(run)] == [20, 30]
    # The same command in a job its scheduler restarted (requeued) goes on from where the run
    # begun from step 15 got to, not from step 15 again, nor from the abandoned step 30; even
    # with step 15 itself pruned since (train.keep_last=1). Through the CLI, as a job runs it.
    assert not earlier.exists()
    caplog.clear()
    caplog.set_level("INFO", logger="mt")
    cache = tmp_path / "cache"
    args = ["train", "--config", str(TINY), f"run_dir={run}", f"data.cache_dir={cache}",
            "train.max_steps=25", "train.keep_last=1", "--resume", str(earlier)]  # fmt: skip
    again = CliRunner().invoke(cli_app, args, env={"SLURM_RESTART_COUNT": "1"})
    assert again.exit_code == 0, again.exception
    assert f"{run} goes on from its own step-00000020; --resume {earlier} began it" in (
        caplog.messages
    )
    assert [r["step"] for r in read_metrics(run, "train")][-1] == 25
    assert ckpt.latest_descendant(run, ckpt.Checkpoint.from_weights(earlier)).step == 25


@pytest.mark.slow
def test_a_requeued_job_goes_on_from_its_own_latest_where_the_best_it_went_back_to_moved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=30"))  # checkpoints at 15 and 30
    steps = {c.step: c for c in ckpt.list_checkpoints(run)}
    ckpt.set_best(run, steps[15])
    monkeypatch.setenv("SLURM_JOB_ID", "8")  # job 8 goes back to the run's best, step 15
    keep = "train.keep_last=10"
    train(tiny(run, "train.max_steps=45", keep), resume=run)
    assert [c.step for c in ckpt.list_checkpoints(run)] == [15, 30, 45]
    ckpt.set_best(run, ckpt.list_checkpoints(run)[1])  # its own step 30 became the best
    caplog.clear()
    caplog.set_level("INFO", logger="mt")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued: the same command again
    again = train(tiny(run, "train.max_steps=50", keep), resume=run)
    # From its own latest (45), not from the best that `run` names now (30: 15 updates lost).
    assert f"{run} goes on from its own step-00000045; --resume {run} began it" in caplog.messages
    assert again.state.step == 50
    # Another command of the same job (one allocation, several steps) goes back to step 15 and is
    # restarted: it goes on from its own step 20, not from the first command's later 50.
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    earlier = steps[15].weights
    train(tiny(run, "train.max_steps=20", keep), resume=earlier)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    caplog.clear()
    after = train(tiny(run, "train.max_steps=25", keep), resume=earlier)
    assert f"{run} goes on from its own step-00000020; --resume {earlier} began it" in (
        caplog.messages
    )
    assert after.state.step == 25


@pytest.mark.slow
def test_a_requeued_job_whose_latest_checkpoint_is_damaged_goes_on_from_the_one_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    every = ("train.valid_every=5", "train.keep_last=10")
    train(tiny(run, "train.max_steps=15", *every))
    began = run / "checkpoints" / "step-00000015.safetensors"
    monkeypatch.setenv("SLURM_JOB_ID", "8")
    train(tiny(run, "train.max_steps=25", *every), resume=began)  # its own 20 and 25
    damaged = ckpt.latest_checkpoint(run)
    data = damaged.weights.read_bytes()
    damaged.weights.write_bytes(data[:-8] + bytes(8))  # the last tensor's bytes zeroed
    caplog.clear()
    caplog.set_level("INFO", logger="mt")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued: the same command again
    # The repair sets step 25 aside before the job's checkpoint to go on from is chosen.
    assert train(tiny(run, "train.max_steps=30", *every), resume=began).state.step == 30
    assert f"{run} goes on from its own step-00000020; --resume {began} began it" in (
        caplog.messages
    )


def poisoned_loss(calls_to_poison: set[int] | None):
    """label_smoothed_nll, but NaN on the given calls (all calls for None)."""
    calls = {"n": 0}
    real = train_module.label_smoothed_nll

    def loss(logits: torch.Tensor, target: torch.Tensor, epsilon: float, pad_id: int = 0):
        calls["n"] += 1
        loss_sum, nll_sum, n = real(logits, target, epsilon, pad_id)
        if calls_to_poison is None or calls["n"] in calls_to_poison:
            loss_sum = loss_sum * float("nan")
        return loss_sum, nll_sum, n

    return loss


def test_non_finite_loss_stops_without_updating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=15"))
    before = weights(run)
    monkeypatch.setattr(train_module, "label_smoothed_nll", poisoned_loss({1}))
    with pytest.raises(MtError) as err:
        train(tiny(run, "train.max_steps=30"))
    crash = run / "checkpoints" / "crash-step-00000016.safetensors"
    assert str(err.value) == (
        f"non-finite loss or gradient at step 16; parameters were not updated; weights saved to "
        f"{crash} (try a lower train.lr or train.clip_norm)"
    )
    after = load_file(crash)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert ckpt.latest_checkpoint(run).step == 15  # the crash file is never resumed from


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.slow
def test_mixed_precision_on_cpu(tmp_path: Path, precision: str) -> None:
    result = train(tiny(tmp_path / "run", "train.max_steps=15", f"train.precision={precision}"))
    valid = read_metrics(tmp_path / "run", "valid")
    assert result.state.step == 15
    assert torch.isfinite(torch.tensor(valid[-1]["loss"]))
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "run").values())


def test_fp16_overflow_skips_steps_then_stops_at_the_floor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every gradient overflows: each step is skipped and halves the loss scale (65536 at start).
    monkeypatch.setattr(train_module, "label_smoothed_nll", poisoned_loss(None))
    config = tiny(
        tmp_path / "run", "train.max_steps=30", "train.precision=fp16", "train.min_loss_scale=10000"
    )
    with pytest.raises(MtError) as err:
        train(config)
    # 65536 -> 32768 -> 16384 -> 8192 < 10000 after 3 skipped updates, none counted.
    assert str(err.value) == (
        "fp16 loss scale fell to 8192 after 3 overflowing updates at step 0 (below "
        "train.min_loss_scale=10000): gradients keep overflowing; use train.precision=bf16, "
        "or a lower train.lr"
    )


def validations_scoring(monkeypatch: pytest.MonkeyPatch, bleus: list[float]) -> None:
    """Make the run's validations score these dev BLEUs in turn (every dev loss 1.0)."""
    scores = iter(bleus)
    record = {"loss": 1.0, "nll": 1.0, "ppl": 2.7}
    monkeypatch.setattr(train_module, "validate", lambda run: {**record, "bleu": next(scores)})


def test_a_best_checkpoint_whose_pointer_was_never_moved_becomes_the_best_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    validations_scoring(monkeypatch, [10.0, 20.0, 5.0])
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=10", "train.valid_every=5"))
    assert ckpt.best_checkpoint(run).step == 10
    first = ckpt.list_checkpoints(run)[0]
    ckpt.set_best(run, first)  # as if killed after saving step 10, before moving `best`
    train(tiny(run, "train.max_steps=11", "train.valid_every=5"))  # 5.0 at step 11: no better
    assert ckpt.best_checkpoint(run).step == 10
    assert "warning: step-00000010 was saved as the best; checkpoints/best now says so" in (
        caplog.messages
    )


def test_going_back_and_saving_the_best_step_worse_moves_best_to_the_real_best(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    validations_scoring(monkeypatch, [25.0, 30.0, 10.0, 12.0, 24.0])
    run = tmp_path / "run"
    every = ("train.valid_every=5", "train.keep_last=5")
    train(tiny(run, "train.max_steps=20", *every))  # 25, 30 (best, step 10), 10, 12
    assert ckpt.best_checkpoint(run).step == 10
    first = run / "checkpoints" / "step-00000005.safetensors"
    result = train(tiny(run, "train.max_steps=10", *every), resume=first)
    # Step 10 again, now 24: the weights `best` named are gone, and the best on disk up to
    # step 10 is step 5's 25, as the state resumed from says.
    assert ckpt.best_checkpoint(run).step == 5
    assert (result.state.best_bleu, result.state.bad_validations) == (25.0, 1)
    assert [c.step for c in ckpt.list_checkpoints(run)] == [5, 10, 15, 20]


def test_going_back_points_best_at_the_best_up_to_the_step_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    validations_scoring(monkeypatch, [10.0, 20.0, 5.0, 30.0, 8.0])
    run = tmp_path / "run"
    every = ("train.valid_every=5", "train.keep_last=5")
    train(tiny(run, "train.max_steps=20", *every))  # 10, 20, 5, 30 (best, step 20)
    assert ckpt.best_checkpoint(run).step == 20
    earlier = run / "checkpoints" / "step-00000010.safetensors"
    result = train(tiny(run, "train.max_steps=15", *every), resume=earlier)  # 8: no better
    # Step 20 is of the steps left behind: the best of those trained now is step 10's 20.0.
    assert [m for m in caplog.messages if m.startswith("warning: checkpoints/best")] == [
        "warning: checkpoints/best named step-00000020, later than step-00000010 resumed; "
        "it now names step-00000010, the best up to that step"
    ]
    assert ckpt.best_checkpoint(run).step == 10
    assert (result.state.best_bleu, result.state.bad_validations) == (20.0, 1)


def test_a_best_set_aside_as_damaged_gives_way_to_the_best_scoring_checkpoint_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    validations_scoring(monkeypatch, [30.0, 25.0, 35.0, 28.0, 20.0])
    run = tmp_path / "run"
    every = ("train.valid_every=5", "train.keep_last=5")
    train(tiny(run, "train.max_steps=15", *every))  # 30, 25, 35 (best, step 15)
    damaged = ckpt.best_checkpoint(run)
    assert damaged.step == 15
    data = damaged.weights.read_bytes()
    damaged.weights.write_bytes(data[:-8] + bytes(8))  # the last tensor's bytes zeroed
    train(tiny(run, "train.max_steps=20", *every))  # from step 10: 28 and 20, no better than 30
    pointer = run / "checkpoints" / "best"
    assert [m for m in caplog.messages if m.startswith(str(pointer))] == [
        f"{pointer}: points to step-00000015, which does not exist; pointed it at the "
        "best-scoring checkpoint left, step-00000005 (dev BLEU 30.00)"
    ]
    # Not the latest whole one (step 10, 25.0): the run's best stays the best on disk.
    assert ckpt.best_checkpoint(run).step == 5


def test_a_validation_that_uses_up_the_time_ends_the_run_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def slow_validate(run) -> dict[str, float]:
        run.state.train_seconds += 3600  # as if it took an hour
        return {"loss": 1.0, "nll": 1.0, "ppl": 2.7, "bleu": 10.0}

    monkeypatch.setattr(train_module, "validate", slow_validate)
    run = tmp_path / "run"
    config = tiny(run, "train.max_steps=100", "train.valid_every=5", "train.max_minutes=30")
    # Not one more update, validated and saved again an hour later.
    assert train(config).state.step == 5
    assert [r["step"] for r in read_metrics(run, "valid")] == [5]
    assert [c.step for c in ckpt.list_checkpoints(run)] == [5]


def test_the_time_a_checkpoint_takes_to_save_counts_against_max_minutes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Clock:
        """The time module as train.py sees it, where a save takes an hour."""

        offset = 0.0

        def perf_counter(self) -> float:
            return time.perf_counter() + self.offset

        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

    clock, save = Clock(), train_module.save

    def slow_save(*args, **kwargs) -> ckpt.Checkpoint:
        saved = save(*args, **kwargs)
        clock.offset += 3600  # a network disk
        return saved

    monkeypatch.setattr(train_module, "time", clock)
    monkeypatch.setattr(train_module, "save", slow_save)
    run = tmp_path / "run"
    config = tiny(run, "train.max_steps=100", "train.valid_every=5", "train.max_minutes=30")
    assert train(config).state.step == 5  # not an update more once the save used the time up


def test_early_stopping_on_patience(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    validations_scoring(monkeypatch, [10.0, 12.0, 11.0, 11.5, 9.0, 20.0])
    run = tmp_path / "run"
    result = train(tiny(run, "train.max_steps=100", "train.valid_every=5", "train.patience=2"))
    # Best 12.0 at step 10; 11.0 (step 15) and 11.5 (step 20) are not better: stop at step 20.
    assert result.state.step == 20
    assert result.state.best_bleu == 12.0
    assert ckpt.best_checkpoint(run).step == 10
    assert [r["bleu"] for r in read_metrics(run, "valid")] == [10.0, 12.0, 11.0, 11.5]
    # The same command again: the run is over, as one at max_steps is.
    again = train(tiny(run, "train.max_steps=100", "train.valid_every=5", "train.patience=2"))
    assert again.idle and again.state.step == 20
    # A larger patience goes on: 9.0 (step 25) is the third validation without a better BLEU.
    more = train(tiny(run, "train.max_steps=100", "train.valid_every=5", "train.patience=3"))
    assert more.state.step == 25 and not more.idle


def test_time_limit_stops_with_a_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="mt")
    run = tmp_path / "run"
    result = train(tiny(run, "train.max_steps=1000", "train.max_minutes=0.00001"))
    assert 1 <= result.state.step < 5 and result.signum is None
    assert ckpt.latest_checkpoint(run).step == result.state.step
    assert f"reached train.max_minutes=1e-05 at step {result.state.step}" in caplog.text
    # Run again with the budget spent already: no further update, no second validation.
    valid = read_metrics(run, "valid")
    again = train(tiny(run, "train.max_steps=1000", "train.max_minutes=0.00001"))
    assert again.idle  # nothing to do: the end's average and report are not made again
    assert again.state.step == result.state.step == ckpt.latest_checkpoint(run).step
    assert read_metrics(run, "valid") == valid and valid[-1]["step"] == result.state.step


def test_a_checkpoint_without_its_tokenizer_is_refused_before_any_data_work(
    tmp_path: Path,
) -> None:
    first = tmp_path / "first"
    train(tiny(first, "train.max_steps=2", "train.valid_every=2"))
    lone = tmp_path / "copied" / "checkpoints"  # the two files alone, away from their run
    lone.mkdir(parents=True)
    for name in ("step-00000002.safetensors", "step-00000002.state.pt"):
        shutil.copy(first / "checkpoints" / name, lone / name)
    run = tmp_path / "tune"
    with pytest.raises(ConfigError) as err:
        train(tiny(run, "train.max_steps=4"), resume=lone / "step-00000002.safetensors")
    assert str(err.value) == (
        f"--resume {lone / 'step-00000002.safetensors'}: no tokenizer in its run "
        f"({tmp_path / 'copied' / 'tokenizer'}) or in this one ({run / 'tokenizer'}); copy the "
        f"tokenizer it was trained with to {run / 'tokenizer'}"
    )
    assert not (run / "tokenizer").exists()


def test_a_resumed_run_trains_with_its_own_optimizer_settings(tmp_path: Path) -> None:
    first = tmp_path / "first"
    train(tiny(first, "train.max_steps=10", "train.valid_every=10", "train.cooldown=0.2"))
    settings = [
        "train.lr=1e-4",
        "train.weight_decay=0.5",
        "train.betas=[0.8, 0.9]",
        "train.eps=1e-6",
    ]
    tune = tmp_path / "tune"  # another run from the cooled-down end of the first: a fine-tune
    config = tiny(
        tune, "train.max_steps=14", "train.valid_every=14", "train.log_every=1", *settings
    )
    result = train(config, resume=first / "checkpoints" / "step-00000010.safetensors")
    assert result.state.step == 14 and result.state.cooldown_steps == 0  # its own schedule
    assert ckpt_state(tune, 14)["train"]["clock_step"] == 10  # its clock began at the start
    group = ckpt_state(tune, 14)["optimizer"]["param_groups"][0]
    assert (group["initial_lr"], group["weight_decay"], tuple(group["betas"]), group["eps"]) == (
        1e-4, 0.5, (0.8, 0.9), 1e-6
    )  # fmt: skip
    logged = [r["lr"] for r in read_metrics(tune, "train")]
    assert logged == pytest.approx([1e-4 * math.sqrt(5 / step) for step in (11, 12, 13, 14)])
    assert group["lr"] == pytest.approx(1e-4 * math.sqrt(5 / 15))  # the next update's
    again = tiny(tune, "train.max_steps=15", "train.valid_every=15", "train.lr=2e-4", *settings[1:])
    train(again)  # a rerun of the run itself, with another lr
    assert ckpt_state(tune, 15)["optimizer"]["param_groups"][0]["initial_lr"] == 2e-4


def ckpt_state(run: Path, step: int) -> dict:
    """The training state saved with a run's checkpoint of `step`."""
    return ckpt.load_training_state(ckpt.Checkpoint.from_weights(
        run / "checkpoints" / f"step-{step:08d}.safetensors"
    ))  # fmt: skip


@pytest.mark.slow  # a second or more: the full suite runs it
def test_average_last_at_the_end(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    config = tiny(run, "train.max_steps=30", "train.keep_last=2", "train.average_last=2")
    finish(config, train(config))  # what `mt train` runs when training ends
    a, b = (weights_at(run, step) for step in (15, 30))
    average = load_file(run / "checkpoints" / "average.safetensors")
    assert all(torch.allclose(average[k], (a[k] + b[k]) / 2, atol=1e-7) for k in a)
    assert model_checkpoint(run).weights == run / "checkpoints" / "average.safetensors"
    # Asked for more than the run has (one validation, one checkpoint): it says so.
    few = tiny(
        tmp_path / "few", "train.max_steps=20", "train.valid_every=100", "train.average_last=2"
    )
    finish(few, train(few))
    assert "warning: train.average_last=2, but the run has only 1 checkpoint (see " \
        "train.keep_last and train.valid_every)" in caplog.messages  # fmt: skip
    # Went on without averaging: the average is of steps long gone, and the report scores best.
    on = tiny(run, "train.max_steps=60", "train.keep_last=2")
    finish(on, train(on))
    assert model_checkpoint(run).weights == ckpt.best_checkpoint(run).weights
    # A run without a checkpoint (all set aside, say) has nothing to average: it says so.
    empty = tiny(tmp_path / "empty", "train.average_last=2", "train.report=false")
    finish(empty, TrainResult(TrainState(step=5)))
    assert (
        "warning: train.average_last=2, but the run has no checkpoint to average (see "
        in "".join(caplog.messages)
    )


def test_an_average_of_one_makes_the_last_checkpoint_the_runs_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # configs/multi30k*.yaml: the run's model is its last checkpoint, not its best by dev BLEU.
    validations_scoring(monkeypatch, [10.0, 30.0, 20.0])
    run = tmp_path / "run"
    config = tiny(run, "train.max_steps=45", "train.average_last=1", "train.ema_decay=0.9")
    finish(config, train(config))
    assert ckpt.best_checkpoint(run).step == 30
    assert model_checkpoint(run).weights == run / "checkpoints" / "average.safetensors"
    average, last = load_file(model_checkpoint(run).weights), weights_at(run, 45)
    assert average.keys() == last.keys() and all(torch.equal(average[k], last[k]) for k in last)


def test_the_end_average_of_a_run_gone_back_leaves_out_the_later_steps(tmp_path: Path) -> None:
    run = tmp_path / "run"
    kept = ("train.keep_last=2", "train.average_last=2", "train.report=false")
    train(tiny(run, "train.max_steps=30", *kept))  # checkpoints at 15 and 30
    back = tiny(run, "train.max_steps=20", *kept)
    finish(back, train(back, resume=run / "checkpoints" / "step-00000015.safetensors"))
    average = run / "checkpoints" / "average.safetensors"
    assert ckpt.averaged_steps(average) == [15, 20]  # not the abandoned step 30
    # Step 30 stays (--resume's warning says so), older than the average: that is the run's
    # model, which its report scores, until the run trains on.
    assert [c.step for c in ckpt.list_checkpoints(run)] == [15, 20, 30]
    assert model_checkpoint(run).weights == average
    finish(back, train(back))  # an idle rerun: the average stands
    assert model_checkpoint(run).weights == average
    on = tiny(run, "train.max_steps=45", *kept)
    train(on)  # goes on from the newest, step 30, to 45 (a signal's resume point: no average)
    assert model_checkpoint(run).weights != average


def weights_at(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step-{step:08d}.safetensors")


def test_average_last_needs_the_checkpoints_kept(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.average_last=3 exceeds train\.keep_last=2"):
        tiny(tmp_path / "run", "train.keep_last=2", "train.average_last=3")


@pytest.mark.parametrize(("precision", "failing_call"), [("fp32", 2), ("fp16", 2), ("fp16", 1)])
def test_out_of_memory_skips_the_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str, failing_call: int
) -> None:
    real = train_module.label_smoothed_nll
    calls = {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == failing_call:  # fp16's first: before the loss scaler ever scaled
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "label_smoothed_nll", loss)
    run = tmp_path / "run"
    overrides = ["train.max_steps=5", "train.valid_every=1000", "train.log_every=1"]
    result = train(tiny(run, *overrides, f"train.precision={precision}"))
    assert result.state.step == 5 and result.state.oom_steps == 1
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2, 3, 4, 5]


def test_out_of_memory_in_validation_keeps_the_step_and_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    real = train_module.validate_direction
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=2", "train.valid_every=2"))
    # At a due validation (step 3), then at the end of a run (step 6), each resumed after.
    cases = [(5, 3, 3, [2], [2, 3, 4]), (6, 100, 6, [2, 3, 4], [2, 3, 4, 6])]
    for steps, valid_every, failing, before, after in cases:
        best = ckpt.best_step(run)
        monkeypatch.setattr(train_module, "validate_direction", out_of_memory)
        with pytest.raises(MtError) as err:
            train(tiny(run, f"train.max_steps={steps}", f"train.valid_every={valid_every}"))
        assert str(err.value) == (
            f"validation at step {failing} ran out of GPU memory: lower train.valid_max_tokens "
            f"(now 8,192) or decode.valid_beam (now 1) and run again (step {failing} is saved: "
            "the run resumes from it, validating it first)"
        )
        # The updates since the last checkpoint are kept; nothing claims to be validated.
        assert ckpt.latest_checkpoint(run).step == failing
        assert ckpt.best_step(run) == best
        assert [r["step"] for r in read_metrics(run, "valid")] == before
        monkeypatch.setattr(train_module, "validate_direction", real)
        result = train(tiny(run, f"train.max_steps={after[-1]}", "train.valid_every=100"))
        assert result.state.step == after[-1]
        assert [r["step"] for r in read_metrics(run, "valid")] == after  # `failing` first


def test_out_of_memory_in_the_backward_skips_the_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = train_module.label_smoothed_nll
    calls = {"n": 0}

    def raise_oom(grad: torch.Tensor) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected in backward)")

    def loss(*args, **kwargs):
        calls["n"] += 1
        loss_sum, nll_sum, n = real(*args, **kwargs)
        if calls["n"] == 3:  # the last (second) micro-batch of update 2
            loss_sum.register_hook(raise_oom)
        return loss_sum, nll_sum, n

    monkeypatch.setattr(train_module, "label_smoothed_nll", loss)
    run = tmp_path / "run"
    overrides = ["train.max_steps=4", "train.update_freq=2", "train.log_every=1"]
    result = train(tiny(run, *overrides, "train.valid_every=1000"))
    assert result.state.step == 4 and result.state.oom_steps == 1
    state = ckpt.load_state(ckpt.latest_checkpoint(run).state)
    assert state["optimizer"]["state"][0]["step"].item() == 4  # the skipped update never ran


VOLATILE = {"time", "tgt_tok_s", "rank_tgt_tok_s", "data_seconds", "seconds", "train_seconds"}


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without times, throughput and precision records.

    Each process that trains records how it chose its precision: a resumed run has two.
    """
    return [
        {k: v for k, v in r.items() if k not in VOLATILE}
        for r in read_metrics(run_dir)
        if r["kind"] != "precision"
    ]


@pytest.mark.slow
def test_metrics_after_a_kill_9_equal_an_uninterrupted_runs(tmp_path: Path) -> None:
    # Records written after the last checkpoint are run again on resume: they are dropped.
    steps = ["train.max_steps=30", "train.log_every=2", "train.valid_every=10"]
    straight = tmp_path / "straight"
    train(tiny(straight, *steps))
    split = tmp_path / "split"
    proc = run_cli(split, *steps)
    wait_for_step(proc, 12)  # 8 updates before the next checkpoint: room on a busy machine
    proc.kill()
    proc.communicate(timeout=60)
    assert max(r["step"] for r in read_metrics(split)) > ckpt.latest_checkpoint(split).step
    train(tiny(split, *steps))
    assert records(split) == records(straight)


def test_a_run_with_nothing_to_do_keeps_its_config(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=15"))
    before = (run / "config.yaml").read_bytes()
    assert train(tiny(run, "train.max_steps=15", "train.lr=0.5")).idle
    assert (run / "config.yaml").read_bytes() == before


@pytest.mark.slow  # a second or more: the full suite runs it
def test_a_rerun_at_the_end_does_the_average_and_report_a_signal_stopped(tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = tiny(run, "train.max_steps=10", "train.average_last=2", "train.report=true")
    result = train(config)
    # A signal while they ran: training had ended, its average and report had not been written.
    finish(config, dataclasses.replace(result, signum=signal.SIGTERM))
    report, average = run / "report.md", run / "checkpoints" / "average.safetensors"
    assert not report.exists() and not average.exists()
    rerun = train(config)
    assert rerun.idle
    finish(config, rerun)
    assert report.is_file() and average.is_file()
    written = report.stat().st_mtime_ns, average.stat().st_mtime_ns
    finish(config, train(config))  # nothing missing: nothing done again
    assert (report.stat().st_mtime_ns, average.stat().st_mtime_ns) == written
    # Extended by two steps, and a signal while the jobs ran: the old average and report were
    # of 10 steps; the idle rerun makes them anew.
    longer = dataclasses.replace(config, train=dataclasses.replace(config.train, max_steps=12))
    finish(longer, dataclasses.replace(train(longer), signum=signal.SIGTERM))
    assert ckpt.averaged_steps(average)[-1] == 10
    finish(longer, train(longer))
    assert ckpt.averaged_steps(average)[-1] == 12
    assert report.stat().st_mtime_ns > written[0]


def test_a_run_without_a_test_set_ends_with_its_report(tmp_path: Path) -> None:
    # The run's own device (tiny.yaml: cpu) is no --device option given to `mt report`.
    run = tmp_path / "run"
    config = tiny(run, "train.max_steps=2", "train.report=true", "data.test=")
    finish(config, train(config))
    text = (run / "report.md").read_text(encoding="utf-8")
    assert "## Training" in text and "## Test" not in text


def test_a_rerun_at_the_end_with_another_average_or_report_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    finish(tiny(run, "train.max_steps=4"), train(tiny(run, "train.max_steps=4")))
    config = tiny(run, "train.max_steps=4", "train.average_last=2", "train.report=true")
    rerun = train(config)
    assert rerun.idle
    finish(config, rerun)
    # An average the run's model would never be (its config.yaml keeps average_last 0).
    assert not (run / "checkpoints" / "average.safetensors").exists()
    assert not (run / "report.md").exists()
    assert [m for m in caplog.messages if m.startswith("warning")] == [
        f"warning: {run} has ended: train.average_last=2 and train.report=true change nothing "
        "(its config.yaml decides its model and report; `mt average` and `mt report` make "
        "others)"
    ]


@pytest.mark.slow  # a second or more: the full suite runs it
def test_the_end_of_run_jobs_hold_the_run_lock(tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = tiny(run, "train.max_steps=10", "train.average_last=1", "train.report=true")
    result = train(config)
    # A second trainer took the run directory in the meantime:
    in_use = pytest.raises(MtError, match=r"the run directory is in use by PID \d+")
    with hold_run_lock(run), in_use:
        finish(config, result)
    assert not (run / "report.md").exists()
    assert not (run / "checkpoints" / "average.safetensors").exists()
    finish(config, result)
    assert (run / "report.md").is_file()


def test_a_signal_during_the_last_step_still_ends_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    config = tiny(run, "train.max_steps=10", "train.valid_every=5", "train.log_every=5")
    sigterm_at_step(monkeypatch, 10)  # during the last step
    assert train(config).signum == signal.SIGTERM  # exits 143: the scheduler is waiting
    monkeypatch.undo()
    # The step was done and validated: the run has ended, and says so.
    assert [r["step"] for r in read_metrics(run, "valid")] == [5, 10]
    assert [r["step"] for r in read_metrics(run, "end")] == [10]
    assert train(config).idle  # the rerun does what `finish` still has to do


def test_a_signal_during_the_validation_that_ends_a_resumed_run_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    steps = ["train.valid_every=100", "train.log_every=3"]
    sigterm_at_step(monkeypatch, 6)
    assert train(tiny(run, "train.max_steps=8", *steps)).signum == signal.SIGTERM
    monkeypatch.undo()
    assert read_metrics(run, "valid") == []  # stopped fast, its last step unvalidated
    stopped = ckpt.latest_checkpoint(run).step
    config = tiny(run, f"train.max_steps={stopped}", *steps)  # that step is now the run's end
    sigterm_while_validating(monkeypatch)  # as the rerun validates
    # The validation and save go on; the run then stops as signalled (exit 143, requeued)
    # rather than going on to its average and report.
    assert train(config).signum == signal.SIGTERM
    monkeypatch.undo()
    assert [r["step"] for r in read_metrics(run, "valid")] == [stopped]
    assert [r["step"] for r in read_metrics(run, "end")] == [stopped]
    assert train(config).idle


def test_non_finite_weights_are_never_checkpointed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = train_module.optimizer_step

    def diverging_step(learner, state, min_loss_scale, cooldown=0):
        stepped = real(learner, state, min_loss_scale, cooldown)
        if state.step == 4:  # this update made a weight infinite
            with torch.no_grad():
                learner.model.decoder[0].ffn.fc2.weight[0, 0] = math.inf
        return stepped

    monkeypatch.setattr(train_module, "optimizer_step", diverging_step)
    run = tmp_path / "run"
    with pytest.raises(MtError) as err:
        train(tiny(run, "train.max_steps=10", "train.valid_every=2"))
    crash = run / "checkpoints" / "crash-step-00000004.safetensors"
    assert str(err.value) == (
        "weights are not finite after step 4 (decoder.0.ffn.fc2.weight holds inf or nan); "
        f"no checkpoint written; weights saved to {crash} (try a lower train.lr or "
        "train.clip_norm)"
    )
    assert [c.step for c in ckpt.list_checkpoints(run)] == [2]
    assert all(torch.isfinite(t).all() for t in weights(run).values())


def test_a_nan_dev_loss_is_never_the_best(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scores = iter([(1.0, 10.0), (math.nan, 50.0), (1.0, 12.0)])

    def fake_validate(run) -> dict[str, float]:
        loss, bleu = next(scores)
        return {"loss": loss, "nll": loss, "ppl": 2.7, "bleu": bleu}

    monkeypatch.setattr(train_module, "validate", fake_validate)
    run = tmp_path / "run"
    result = train(tiny(run, "train.max_steps=15", "train.valid_every=5", "train.keep_last=5"))
    assert ckpt.best_checkpoint(run).step == 15
    assert result.state.best_bleu == 12.0


def test_dev_sentences_longer_than_the_model_are_cut_as_translate_cuts_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="mt")
    run = tmp_path / "run"
    short = ["model.max_positions=16", "data.max_len=15", "train.max_steps=4"]
    train(tiny(run, *short, "train.valid_every=2"))
    warnings = [
        r.message for r in caplog.records if "longer than the model's 15 pieces" in r.message
    ]
    assert len(warnings) == 2  # said once for the dev set, once for the test set
    assert warnings[0].startswith("dev: ") and warnings[1].startswith("test: ")
    assert int(warnings[0].split()[1]) > 0  # some sources are longer: the test means something
    valid = read_metrics(run, "valid")
    assert [r["step"] for r in valid] == [2, 4]
    assert all(math.isfinite(r["loss"]) and 0 <= r["bleu"] <= 100 for r in valid)


@pytest.mark.slow
def test_fp16_skipped_updates_do_not_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=15", "train.precision=fp16"))
    monkeypatch.setattr(train_module, "label_smoothed_nll", poisoned_loss({1, 2}))
    result = train(tiny(run, "train.max_steps=16", "train.precision=fp16", "train.log_every=1"))
    assert result.state.step == 16 and result.state.overflow_steps == 2
    state = ckpt.load_state(ckpt.latest_checkpoint(run).state)
    assert state["scheduler"]["last_epoch"] == 16  # the schedule did not advance on skips
    assert state["optimizer"]["state"][0]["step"].item() == 16
    assert [r["step"] for r in read_metrics(run, "train")][-1] == 16


@pytest.mark.parametrize(("first", "then"), [("bf16", "fp16"), ("fp16", "fp32")])
@pytest.mark.slow
def test_precision_may_change_on_resume(tmp_path: Path, first: str, then: str) -> None:
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=15", f"train.precision={first}"))
    result = train(tiny(run, "train.max_steps=20", f"train.precision={then}"))
    assert result.state.step == 20
    assert all(torch.isfinite(t).all() for t in weights(run).values())


SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy", "nonzero")


def test_one_host_read_per_training_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each read of a tensor's value by mt's code would wait for a GPU to finish its queue.
    mt_dir = str(Path(train_module.__file__).parent)
    reads = {"n": 0}

    def counting(name: str):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(mt_dir):
                reads["n"] += 1
            return real(self, *args, **kwargs)

        return wrapper

    at_step: list[int] = []
    real_step = train_module.train_step

    def step(*args, **kwargs):
        at_step.append(reads["n"])
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", step)
    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=12", "train.log_every=100", "train.valid_every=100"))
    per_step = [b - a for a, b in itertools.pairwise(at_step)]
    assert per_step == [1] * 11


@pytest.mark.slow
def test_a_second_trainer_on_the_same_run_directory_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = run_cli(run, "train.max_steps=100000", "train.log_every=1")
    try:  # the first trainer never outlives the test, however it fails
        wait_for_step(first, 1)
        config_before = (run / "config.yaml").read_bytes()
        # The second trainer in-process: a Python start-up less, while the first one trains on.
        cache = run.parent / "cache"
        args = ["train", "--config", str(TINY), f"run_dir={run}", f"data.cache_dir={cache}",
                "train.max_steps=100000", "train.lr=0.5"]  # fmt: skip
        second = CliRunner().invoke(cli_app, args)
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    finally:
        first.kill()
        first.wait()
    assert isinstance(second.exception, MtError)  # main() prints it as one `error:` line
    assert str(second.exception) == (
        f"{run}: the run directory is in use by PID {first.pid} on host {socket.gethostname()}"
    )
    assert (run / "config.yaml").read_bytes() == config_before  # the refused run wrote nothing


def raw_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The trained weights a run keeping an EMA saves in its latest training state."""
    return ckpt.load_state(ckpt.latest_checkpoint(run_dir).state)["model"]


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-identical on the names both hold (a weights file stores tied weights once)."""
    names = a.keys() & b.keys()
    return bool(names) and all(torch.equal(a[k], b[k]) for k in names)


@pytest.mark.slow
def test_ema_resume_is_exact(tmp_path: Path) -> None:
    ema = ["train.ema_decay=0.9", "train.log_every=1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny(straight, "train.max_steps=30", *ema))
    train(tiny(split, "train.max_steps=15", *ema))
    train(tiny(split, "train.max_steps=30", *ema))
    assert identical(weights(split), weights(straight))  # the EMA, in the weights file
    assert identical(raw_weights(split), raw_weights(straight))
    assert not identical(weights(straight), raw_weights(straight))
    assert losses(split) == losses(straight)


def test_the_weights_file_holds_the_ema_of_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    after: list[dict[str, torch.Tensor]] = []  # the weights before training, then after each update
    real = train_module.optimizer_step

    def recording_step(learner, state, min_loss_scale, cooldown=0):
        if not after:
            after.append({k: v.clone() for k, v in learner.model.state_dict().items()})
        stepped = real(learner, state, min_loss_scale, cooldown)
        after.append({k: v.clone() for k, v in learner.model.state_dict().items()})
        return stepped

    monkeypatch.setattr(train_module, "optimizer_step", recording_step)
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=12", "train.ema_decay=0.5", "train.valid_every=12"))
    saved = weights(run)
    for name, tensor in saved.items():
        expected = after[0][name]
        for step, current in enumerate(after[1:], start=1):
            decay = min(0.5, (1 + step) / (10 + step))  # 2/11, 3/12, ..., then 0.5 from step 8
            expected = decay * expected + (1 - decay) * current[name]
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6)
    assert identical(raw_weights(run), after[-1])


def test_a_run_from_another_runs_checkpoint_warms_its_ema_up_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent, child = tmp_path / "parent", tmp_path / "child"
    train(tiny(parent, "train.max_steps=6", "train.ema_decay=0.9", "train.valid_every=6"))
    after: list[dict[str, torch.Tensor]] = []  # the trained weights after each of child's updates
    real = train_module.optimizer_step

    def recording_step(learner, state, min_loss_scale, cooldown=0):
        stepped = real(learner, state, min_loss_scale, cooldown)
        after.append({k: v.clone() for k, v in learner.model.state_dict().items()})
        return stepped

    monkeypatch.setattr(train_module, "optimizer_step", recording_step)
    config = tiny(child, "train.max_steps=10", "train.ema_decay=0.9", "train.valid_every=10")
    train(config, resume=parent / "checkpoints" / "step-00000006.safetensors")
    assert len(after) == 4  # updates 7-10, the child's own 1-4
    for name, tensor in weights(child).items():
        expected = weights(parent)[name]  # the parent's model, its EMA
        for step, current in enumerate(after, start=1):
            decay = min(0.9, (1 + step) / (10 + step))  # 2/11, 3/12, ...: the child's own
            expected = decay * expected + (1 - decay) * current[name]
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6)


def test_a_run_from_another_runs_checkpoint_cools_down_over_its_own_steps() -> None:
    steps = load_config(TINY, ["train.max_steps=55000", "train.cooldown=0.2"]).train
    due = train_module.cooldown_due
    assert due(steps, TrainState(step=50000, clock_step=50000), 0.0) == 0
    assert due(steps, TrainState(step=53998, clock_step=50000), 0.0) == 0
    assert due(steps, TrainState(step=53999, clock_step=50000), 0.0) == 1000  # its last fifth


@pytest.mark.slow
def test_validation_leaves_blank_dev_sources_untranslated_as_mt_translate_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = (ROOT / "tests" / "data" / "tiny" / "valid.de").read_text().splitlines()[:6]
    refs = (ROOT / "tests" / "data" / "tiny" / "valid.en").read_text().splitlines()[:6]
    sources[1] = sources[4] = "  "  # blank sources, references kept
    (tmp_path / "dev.de").write_text("\n".join(sources) + "\n")
    (tmp_path / "dev.en").write_text("\n".join(refs) + "\n")
    seen: list[list[str]] = []
    score = sacrebleu.corpus_bleu

    def every_row_says_piece_10(model, src, config, *args, **kwargs) -> list[list[Hypothesis]]:
        return [[Hypothesis([10], 0.0, 0.0)] for _ in range(src.shape[0])]

    def corpus_bleu(hypotheses: list[str], references, **kwargs):
        seen.append(list(hypotheses))
        return score(hypotheses, references, **kwargs)

    monkeypatch.setattr(train_module.search, "decode", every_row_says_piece_10)
    monkeypatch.setattr(train_module.sacrebleu, "corpus_bleu", corpus_bleu)
    train(tiny(tmp_path / "run", f"data.valid={tmp_path / 'dev'}", "train.max_steps=2"))
    said = load_tokenizer(tmp_path / "run" / "tokenizer").decode_tgt([[10]])[0]
    assert said and seen and all(hyps == [said, "", said, said, "", said] for hyps in seen)


def test_validation_scores_outputs_as_mt_translate_prints_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An output spelling a line break (byte pieces): mt translate prints it as a space, and
    # sacreBLEU's 13a would join "well-\nknown" into one word.
    seen: list[list[str]] = []
    score = sacrebleu.corpus_bleu

    def corpus_bleu(hypotheses: list[str], references, **kwargs):
        seen.append(list(hypotheses))
        return score(hypotheses, references, **kwargs)

    monkeypatch.setattr(train_module.sacrebleu, "corpus_bleu", corpus_bleu)
    monkeypatch.setattr(Tokenizer, "decode_tgt", lambda self, ids: ["well-\nknown"] * len(ids))
    train(tiny(tmp_path / "run", "train.max_steps=2"))
    assert seen and all(set(hyps) == {"well- known"} for hyps in seen)


def test_validation_leaves_the_ema_in_eval_mode_and_the_trained_model_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, modes = train_module.validate_direction, []

    def recording(run, dev):
        scores = real(run, dev)
        modes.append((run.learner.model.training, run.learner.eval_model.training))
        return scores

    monkeypatch.setattr(train_module, "validate_direction", recording)
    train(tiny(tmp_path / "run", "train.max_steps=4", "train.valid_every=2", "train.ema_decay=0.9"))
    assert modes == [(True, False), (True, False)]


def test_ema_changes_what_is_validated_and_saved_but_not_training(tmp_path: Path) -> None:
    plain, ema = tmp_path / "plain", tmp_path / "ema"
    train(tiny(plain, "train.max_steps=15"))
    train(tiny(ema, "train.max_steps=15", "train.ema_decay=0.9"))
    assert identical(raw_weights(ema), weights(plain))  # the EMA never feeds back
    assert losses(ema) == losses(plain)
    dev_loss = [[r["loss"] for r in read_metrics(run, "valid")] for run in (plain, ema)]
    assert dev_loss[0] != dev_loss[1]  # the EMA, not the trained weights, was validated


@pytest.mark.slow
def test_initial_dropout_trains_its_updates_at_its_own_rate(tmp_path: Path) -> None:
    none, early, always = (tmp_path / name for name in ("none", "early", "always"))
    logged = ["train.max_steps=8", "train.log_every=1"]
    train(tiny(none, *logged, "model.dropout=0"))
    schedule = ["train.initial_dropout=0", "train.initial_dropout_steps=4"]
    train(tiny(early, *logged, "model.dropout=0.3", *schedule))
    train(tiny(always, *logged, "model.dropout=0.3"))
    without, scheduled, throughout = losses(none), losses(early), losses(always)
    assert [scheduled[s] for s in range(1, 5)] == [without[s] for s in range(1, 5)]
    assert all(scheduled[s] != without[s] for s in range(5, 9))  # model.dropout from update 5
    assert scheduled[1] != throughout[1]


def test_initial_dropout_resume_across_the_switch_is_exact(tmp_path: Path) -> None:
    schedule = ["model.dropout=0.3", "train.initial_dropout=0.1", "train.initial_dropout_steps=6"]
    logged = [*schedule, "train.log_every=1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny(straight, "train.max_steps=12", *logged))
    train(tiny(split, "train.max_steps=3", *logged))
    train(tiny(split, "train.max_steps=12", *logged))
    assert identical(weights(split), weights(straight))
    assert losses(split) == losses(straight)


def test_the_start_says_the_initial_dropout_only_where_it_is_still_ahead(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    schedule = ["model.dropout=0.3", "train.initial_dropout=0.1", "train.initial_dropout_steps=2"]
    caplog.set_level(logging.INFO, logger="mt")
    train(tiny(tmp_path / "run", "train.max_steps=3", *schedule))
    assert "dropout 0.1 for updates 1-2, then 0.3 (train.initial_dropout)" in caplog.messages
    caplog.clear()
    train(tiny(tmp_path / "run", "train.max_steps=4", *schedule))  # resumed at update 3
    said = [m for m in caplog.messages if m.startswith("dropout")]
    assert said == [
        "dropout 0.3: the run goes on from update 3, past train.initial_dropout_steps=2"
    ]


def test_dropout_at_follows_the_schedule() -> None:
    config = load_config(
        TINY, ["model.dropout=0.3", "train.initial_dropout=0.1", "train.initial_dropout_steps=2"]
    )
    assert [train_module.dropout_at(config, step) for step in range(4)] == [0.1, 0.1, 0.3, 0.3]
    plain = load_config(TINY, ["model.dropout=0.3", "train.initial_dropout=0.1"])
    assert train_module.dropout_at(plain, 0) == 0.3  # initial_dropout_steps=0: off


@pytest.mark.parametrize("first", ["0.9", "0"])
@pytest.mark.slow
def test_ema_may_be_turned_on_or_off_on_resume(tmp_path: Path, first: str) -> None:
    plain, switched = tmp_path / "plain", tmp_path / "switched"
    then = "0" if first == "0.9" else "0.9"
    train(tiny(plain, "train.max_steps=15"))
    train(tiny(switched, "train.max_steps=10", f"train.ema_decay={first}"))
    train(tiny(switched, "train.max_steps=15", f"train.ema_decay={then}"))
    # Training continues from the trained weights, whichever file holds them.
    trained = weights(switched) if then == "0" else raw_weights(switched)
    assert identical(trained, weights(plain))


def test_auto_precision_is_measured_logged_and_recorded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="mt")
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=2", "train.precision=auto"))
    [record] = read_metrics(run, "precision")
    assert (record["step"], record["how"]) == (0, "measured")
    assert 8 <= record["rows"] <= 256  # from 8 rows up to train.max_tokens at most
    rates = [record[key] for key in ("fp32_gflops", "bf16_gflops") if key in record]
    assert all(rate > 0 for rate in rates)  # a precision the budget cut short has none
    assert read_metrics(run, "end")[-1]["precision"] == record["precision"]
    assert f"precision: {describe_precision(record)}" in caplog.text


def precisions(run: Path) -> list[tuple[int, str, str]]:
    """(step, precision, how) of each start's precision record."""
    return [(r["step"], r["precision"], r["how"]) for r in read_metrics(run, "precision")]


def test_a_resumed_run_keeps_the_precision_auto_chose_on_this_kind_of_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A busy CPU's timings may choose otherwise at each start: here bf16, then fp32.
    verdicts = iter(["bf16", "fp32"])
    monkeypatch.setattr(device_module, "choose_precision", lambda *args: next(verdicts))
    caplog.set_level("INFO", logger="mt")
    run, auto = tmp_path / "run", "train.precision=auto"
    train(tiny(run, "train.max_steps=2", auto))
    machine = machine_kind(torch.device("cpu"))
    state = ckpt.load_training_state(ckpt.latest_checkpoint(run))
    assert state[train_module.AUTO_PRECISION] == {"precision": "bf16", "machine": machine}
    train(tiny(run, "train.max_steps=4", auto))  # the same command again: it resumes
    assert precisions(run) == [(0, "bf16", "measured"), (2, "bf16", "kept")]
    kept = read_metrics(run, "precision")[-1]
    assert kept["why"] == (
        f"the checkpoint resumed was trained in it on this kind of machine ({machine})"
    )
    assert f"precision: {describe_precision(kept)}" in caplog.messages
    assert read_metrics(run, "end")[-1]["precision"] == "bf16"
    # Requeued on another kind of CPU, where bf16 may be emulated: timed anew.
    monkeypatch.setattr(train_module, "machine_kind", lambda device: "cpu: Another CPU")
    train(tiny(run, "train.max_steps=6", auto))
    assert precisions(run)[-1] == (4, "fp32", "measured")
    assert (
        f"precision: auto chose bf16 on another kind of machine ({machine}; this one is "
        "cpu: Another CPU): choosing anew"
    ) in caplog.messages


def test_a_precision_asked_for_is_not_auto_s_choice_to_keep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(device_module, "choose_precision", lambda *args: "bf16")
    run = tmp_path / "run"
    # tiny.yaml asks for fp32: the state records no choice of auto's, as states before it did.
    train(tiny(run, "train.max_steps=2"))
    assert train_module.AUTO_PRECISION not in ckpt.load_training_state(ckpt.latest_checkpoint(run))
    train(tiny(run, "train.max_steps=4", "train.precision=auto"))  # so auto times
    train(tiny(run, "train.max_steps=6", "train.precision=fp32"))  # asked for: auto's bf16 is not
    assert precisions(run) == [(0, "fp32", "asked"), (2, "bf16", "measured"), (4, "fp32", "asked")]


@pytest.mark.slow
def test_a_validation_put_off_by_a_signal_runs_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = ["train.max_steps=10", "train.valid_every=5", "train.log_every=1"]
    straight = tmp_path / "straight"
    train(tiny(straight, *steps))
    real, calls = train_module.train_step, itertools.count(1)

    def signalled_at_5(*args: object) -> object:  # (learner, batches, tokens, stop, late, seconds)
        learner, batches, tokens, stop, late, seconds, *_ = args
        return real(learner, batches, tokens, stop or next(calls) == 5, late, seconds)

    split = tmp_path / "split"
    monkeypatch.setattr(train_module, "train_step", signalled_at_5)
    result = train(tiny(split, *steps))
    assert (result.signum, result.state.step) == (signal.SIGTERM, 5)
    assert read_metrics(split, "valid") == []  # stopped fast, at a step due for validation
    monkeypatch.undo()
    # As if a resume had validated step 5, then been killed before it saved: its record is
    # left behind, and the next resume validates step 5 again.
    orphan = next(r for r in read_metrics(straight, "valid") if r["step"] == 5)
    with (split / "metrics.jsonl").open("a") as metrics:
        metrics.write(json.dumps(orphan) + "\n")
    train(tiny(split, *steps))
    assert records(split) == records(straight)
    best = ckpt.resolve_checkpoint(split).weights.name
    assert best == ckpt.resolve_checkpoint(straight).weights.name


def test_each_rank_resumes_its_own_share_of_the_logging_window() -> None:
    from types import SimpleNamespace

    from mt.distributed import World, gather_values

    assert gather_values(World(), [1.5, 2.5], torch.device("cpu")) == [[1.5, 2.5]]
    # Float32 sums of each rank, as a checkpoint saved them: each rank goes on adding to its
    # own, as it would have without the stop (the sum of ranks' sums rounds otherwise).
    saved = {"loss": 7.0, "nll": 6.0, "tokens": 90, "time": 2.0, "data_time": 0.1, "steps": 3,
             "grad_norm": 1.0, "rank_losses": [[3.0000001, 2.5], [3.9999999, 3.5]]}  # fmt: skip
    windows = []
    for rank, size in ((0, 2), (1, 2), (0, 1), (1, 3)):
        learner = SimpleNamespace(device=torch.device("cpu"), world=World(rank, size))
        run = SimpleNamespace(learner=learner, world=learner.world, window={})
        train_module.restore_window(run, saved)
        windows.append({k: float(v) for k, v in run.window.items()})
    counts = {k: v for k, v in saved.items() if k not in ("loss", "nll", "rank_losses")}
    empty = dict.fromkeys(counts, 0.0)
    own = [torch.tensor(3.0000001).item(), torch.tensor(3.9999999).item()]  # float32 values
    assert windows[0] == {**counts, "loss": own[0], "nll": 2.5}  # rank 0 keeps the counts
    assert windows[1] == {**empty, "loss": own[1], "nll": 3.5}
    assert windows[2] == {**counts, "loss": 7.0, "nll": 6.0}  # other ranks: rank 0 has it all
    assert windows[3] == {**empty, "loss": 0.0, "nll": 0.0}


@pytest.mark.slow  # a second or more: the full suite runs it
def test_a_run_that_ends_between_log_steps_logs_its_last_updates(tmp_path: Path) -> None:
    run = tmp_path / "run"
    limits = ["train.max_steps=1000", "train.log_every=1000", "train.valid_every=1000"]
    first = train(tiny(run, *limits, "train.max_epochs=1")).state.step
    assert 0 < first < 1000
    logged = read_metrics(run, "train")
    assert [(r["step"], r["tokens_per_update"] > 0) for r in logged] == [(first, True)]
    # Resumed for another epoch: its own updates in a record of their own.
    second = train(tiny(run, *limits, "train.max_epochs=2")).state.step
    assert [r["step"] for r in read_metrics(run, "train")] == [first, second]
    assert first < second < 1000
    # Resumed with nothing left to train: no empty record, nothing done.
    assert train(tiny(run, *limits, "train.max_epochs=2")).idle
    assert [r["step"] for r in read_metrics(run, "train")] == [first, second]


@pytest.mark.slow  # a second or more: the full suite runs it
def test_a_signals_checkpoint_is_neither_kept_nor_averaged_once_the_run_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = ["train.max_steps=12", "train.valid_every=4", "train.keep_last=2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny(straight, *steps))
    sigterm_at_step(monkeypatch, 10)
    assert train(tiny(split, *steps, "train.log_every=1")).signum == signal.SIGTERM
    monkeypatch.undo()
    kept = lambda run: [c.step for c in ckpt.list_checkpoints(run)]  # noqa: E731
    stop = ckpt.latest_checkpoint(split).step  # the resume point: not counted in keep_last
    assert kept(split) == [4, 8, stop] and 8 < stop < 12
    assert [c.step for c in select_last(split, 2)] == [4, 8]
    train(tiny(split, *steps, "train.log_every=1"))
    assert kept(split) == kept(straight)
    assert [c.step for c in select_last(split, 2)] == [8, 12]


def test_a_run_killed_before_its_end_record_writes_it_when_rerun(tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = tiny(run, "train.max_steps=10")
    train(config)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text(encoding="utf-8").splitlines(keepends=True)
    ended = json.loads(lines[-1])
    assert (ended["kind"], ended["step"]) == ("end", 10)
    metrics.write_text("".join(lines[:-1]), encoding="utf-8")  # killed just before writing it
    assert train(config).idle
    assert [(r["step"], r["epoch"]) for r in read_metrics(run, "end")] == [(10, ended["epoch"])]
    assert train(config).idle  # written once
    assert len(read_metrics(run, "end")) == 1


def test_a_model_too_large_for_the_machine_is_refused_before_any_work(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        train(tiny(run, "model.ffn_dim=1000000000000"))
    assert str(err.value).startswith(
        "model: 4 layers of dim 32 and ffn_dim 1000000000000 make at least "
        "256,000,000,000,000 parameters, 3,814,697.3 GiB to train (weights, gradients and "
        "Adam's moments); cpu has "
    )
    with pytest.raises(ConfigError) as err:
        train(tiny(run, "model.max_positions=1000000000000"))
    assert str(err.value).startswith(
        "model.max_positions=1,000,000,000,000: its positional table of 1,000,000,000,000 x 32 "
        "needs 119,209.3 GiB; cpu has "
    )
    assert not run.exists()  # no tokenizer trained, nothing encoded


def test_resuming_mid_epoch_with_another_batch_size_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    assert train(tiny(run, "train.max_steps=5")).state.batches_done > 0  # mid-epoch
    with caplog.at_level(logging.WARNING, logger="mt"):
        train(tiny(run, "train.max_steps=6", "train.max_tokens=300", "train.seed=7"))
    assert caplog.messages == [
        "warning: train.max_tokens (256 -> 300) and train.seed (1 -> 7) changed in epoch 1: the "
        "rest of it is batched anew, so some of its pairs come twice and others not at all (the "
        "next epochs are whole)"
    ]


def test_resuming_compares_the_settings_with_those_the_checkpoint_was_trained_with(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    train(tiny(run, "train.max_steps=5"))  # mid-epoch, with max_tokens 256
    train(tiny(run, "train.max_steps=6", "train.max_tokens=300"))  # config.yaml says 300 now
    five = run / "checkpoints" / "step-00000005.safetensors"

    def resume(*overrides: str) -> list[str]:
        return warned(caplog, "warning: train.", tiny(run, "train.max_steps=6", *overrides), five)

    assert resume() == []  # step 5 was trained with 256, as this run is
    assert resume("train.max_tokens=300") == [
        "warning: train.max_tokens (256 -> 300) changed in epoch 1: the rest of it is batched "
        "anew, so some of its pairs come twice and others not at all (the next epochs are whole)"
    ]


def test_a_new_warmup_on_resume_is_warned_of_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"

    def resume(steps: int, *overrides: str) -> list[str]:
        return warned(caplog, "warning: train.", tiny(run, f"train.max_steps={steps}", *overrides))

    assert resume(5) == []
    assert resume(6, "train.warmup_steps=8") == [
        "warning: train.warmup_steps (5 -> 8) changed since step 5 was saved: the learning rate "
        "follows the new schedule from step 6 on"
    ]
    assert resume(7, "train.warmup_steps=8") == []  # step 6 was trained with 8


def test_a_run_started_mid_epoch_from_another_runs_checkpoint_warns_of_a_new_seed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = tmp_path / "first"
    assert train(tiny(first, "train.max_steps=5")).state.batches_done > 0  # mid-epoch
    start = ckpt.latest_checkpoint(first).weights
    with caplog.at_level(logging.WARNING, logger="mt"):
        train(tiny(tmp_path / "second", "train.max_steps=6", "train.seed=7"), start)
    assert caplog.messages == [
        "warning: train.seed (1 -> 7) changed in epoch 1: the rest of it is batched anew, so "
        "some of its pairs come twice and others not at all (the next epochs are whole)"
    ]


@pytest.mark.slow
def test_a_run_started_from_another_runs_checkpoint_takes_its_tokenizer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = tmp_path / "first"
    train(tiny(first, "train.max_steps=5"))
    start = ckpt.latest_checkpoint(first).weights
    second = tmp_path / "second"
    with pytest.raises(ConfigError) as err:  # before any tokenizer or data work
        train(tiny(second, "train.max_steps=8", "model.ffn_dim=128"), start)
    assert str(err.value) == (
        f"--resume {start}: its run has other model settings (model.ffn_dim: 64 -> 128); set "
        "them as that run's to start from it"
    )
    assert not (second / "tokenizer").exists()
    # Other training text, which would train another vocabulary: the run takes the first's.
    tiny_dir = ROOT / "tests" / "data" / "tiny"
    for lang in ("de", "en"):
        lines = (tiny_dir / f"train.{lang}").read_text(encoding="utf-8").splitlines()[:200]
        (tmp_path / f"half.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    half = [f"data.train={tmp_path / 'half'}"]
    with caplog.at_level(logging.INFO, logger="mt"):
        assert train(tiny(second, "train.max_steps=8", *half), start).state.step == 8
    assert f"using the tokenizer of {first}, whose checkpoint this run starts from" in (
        caplog.messages
    )
    # Not its record of the data: this run trains on other data by design, without a warning.
    assert sorted(p.name for p in (second / "tokenizer").iterdir()) == sorted(
        p.name for p in (first / "tokenizer").iterdir() if p.name != "trained_on.json"
    )
    assert not [m for m in caplog.messages if "trained on" in m]
    # The same command again (a requeued job): the run goes on from its own latest checkpoint.
    with caplog.at_level(logging.INFO, logger="mt"):
        assert train(tiny(second, "train.max_steps=9", *half), start).state.step == 9
    assert f"{second} goes on from its own step-00000008; --resume {start} began it" in (
        caplog.messages
    )
    # A run whose own tokenizer is another: refused at once, not after encoding its data.
    third = tmp_path / "third"
    train(tiny(third, "train.max_steps=2", "tokenizer.vocab_size=90", *half))
    shutil.rmtree(third / "checkpoints")  # its tokenizer alone, as `mt tokenizer train` leaves
    with pytest.raises(ConfigError) as err:
        train(tiny(third, "train.max_steps=8", "tokenizer.vocab_size=90", *half), start)
    assert str(err.value) == (
        f"--resume {start}: its vocabulary is not this run's tokenizer ({third / 'tokenizer'}); "
        "start a new run_dir, which takes the checkpoint run's tokenizer"
    )


def test_the_progress_bar_ends_where_max_minutes_runs_out() -> None:
    timed = load_config(TINY, ["train.max_steps=1000", "train.max_minutes=10"]).train
    state = TrainState(step=100, train_seconds=300.0)
    assert expected_end(timed, state, 0.5) == 100 + 600  # 300 s left at 0.5 s per step
    assert expected_end(timed, state, 0.1) == 1000  # max_steps comes first
    assert expected_end(load_config(TINY, ["train.max_steps=1000"]).train, state, 0.5) == 1000
    state.train_seconds = 900.0  # past the limit: it ends now
    assert expected_end(timed, state, 0.5) == 100


def test_patience_and_select_direction_need_a_dev_set_to_train(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for overrides, message in [
        (["train.patience=2"], "train.patience=2 needs a dev set (data.valid) to stop on"),
        (["data.select_direction=de-en"], "data.select_direction='de-en': that direction has no "
         "dev set (data.valid, or its corpus's valid)"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError) as err:
            train(tiny(run, "data.valid=", *overrides))
        assert str(err.value) == message
    assert not run.exists()  # refused before any work


def test_a_signal_during_the_last_update_is_validated_when_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    config = tiny(run, "train.max_steps=10", "train.valid_every=5")
    real, calls = train_module.train_step, [0]

    def signalled_in_update_10(learner, batches, tokens, stop, *rest):
        calls[0] += 1
        return real(learner, batches, tokens, stop or calls[0] == 10, *rest)

    monkeypatch.setattr(train_module, "train_step", signalled_in_update_10)
    assert train(config).signum == signal.SIGTERM
    monkeypatch.undo()
    assert [r["step"] for r in read_metrics(run, "valid")] == [5]  # a signal stops fast
    rerun = train(config)  # the run is at max_steps, but its end was never validated
    assert not rerun.idle and rerun.state.validated
    assert [r["step"] for r in read_metrics(run, "valid")] == [5, 10]
    assert [r["step"] for r in read_metrics(run, "end")] == [10]
    assert [c.step for c in select_last(run, 1)] == [10]  # no longer a resume point
    assert train(config).idle


@pytest.mark.slow  # a second or more: the full suite runs it
def test_a_resume_point_saved_after_going_back_is_kept_until_a_later_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    steps = ["train.max_steps=20", "train.valid_every=5", "train.keep_last=10"]
    train(tiny(run, *steps))
    earlier = run / "checkpoints" / "step-00000005.safetensors"
    real, calls = train_module.train_step, [0]

    def signalled_in_update_2(learner, batches, tokens, stop, *rest):
        calls[0] += 1
        return real(learner, batches, tokens, stop or calls[0] == 2, *rest)

    monkeypatch.setattr(train_module, "train_step", signalled_in_update_2)
    assert train(tiny(run, *steps), resume=earlier).signum == signal.SIGTERM
    # Its resume point (step 7) is below the run's later checkpoints, and stays with them.
    assert [c.step for c in ckpt.list_checkpoints(run)] == [5, 7, 10, 15, 20]
    assert ckpt.is_resume_point(ckpt.list_checkpoints(run)[1])


class _Encoded:
    """An encoded corpus as dev_references sees it: its cache key and its number of pairs."""

    def __init__(self, pairs: int) -> None:
        self.key, self.pairs = "0f3a", pairs

    def __len__(self) -> int:
        return self.pairs


def test_a_dev_set_whose_cache_entry_disagrees_with_its_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "dev.tsv"
    path.write_text("de\ten\nEin Hund\tA dog\nEine Katze\tA cat\n", encoding="utf-8")
    corpus = open_corpus(str(path), "de", "en")
    assert dev_references(corpus, _Encoded(2)) == ["A dog", "A cat"]  # type: ignore[arg-type]
    with pytest.raises(MtError) as error:
        dev_references(corpus, _Encoded(3))  # type: ignore[arg-type]
    assert str(error.value) == (
        f"{path}: 2 pairs, but its encoded copy in the cache (0f3a) has 3: delete that entry of "
        "data.cache_dir and run again"
    )


def test_a_run_whose_checkpoints_cannot_be_written_stops_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)  # e.g. a copied run whose checkpoints are read-only
    probe = rundir_module.tempfile.TemporaryFile

    def read_only_checkpoints(*args: object, **kwargs: Any) -> Any:
        if kwargs.get("dir") == checkpoints:
            raise PermissionError(13, "Permission denied")
        return probe(*args, **kwargs)

    monkeypatch.setattr(rundir_module.tempfile, "TemporaryFile", read_only_checkpoints)
    args = ["train", "--config", str(TINY), f"run_dir={tmp_path / 'run'}"]
    result = CliRunner().invoke(cli_app, [*args, f"data.cache_dir={tmp_path / 'cache'}"])
    assert str(result.exception) == (
        f"run_dir {checkpoints}: cannot write files in {checkpoints} (Permission denied)"
    )
    assert not (tmp_path / "run" / "tokenizer").exists()  # nothing done before it


def test_a_compile_that_fails_here_is_refused_before_any_data_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_compiler(fn: Any, **kwargs: Any) -> Any:
        def compiled(*args: Any) -> Any:
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore")

        return compiled

    monkeypatch.setattr(torch, "compile", no_compiler)
    run = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        train(tiny(run, "train.compile=true", "train.max_steps=2"))
    assert str(err.value) == (
        "train.compile=true: torch.compile fails on this machine (InvalidCxxCompiler: No working "
        "C++ compiler found); set train.compile=false"
    )
    assert not (run / "tokenizer").exists()


def test_the_metrics_are_on_disk_before_the_checkpoint_that_follows_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and os.fstat(fd).st_ino == metrics.stat().st_ino:
            events.append("metrics synced")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        if str(dst).endswith(".state.pt"):
            events.append("state renamed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    train(tiny(run, "train.max_steps=4", "train.valid_every=2"))
    assert events == ["metrics synced", "state renamed"] * 2


def test_a_signal_while_the_end_of_a_stopped_run_is_saved_waits_for_the_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = ["train.max_epochs=1", "train.valid_every=1000"]  # its end: no validation due
    run = tmp_path / "run"
    real_step, calls = train_module.train_step, itertools.count(1)
    last = train(tiny(tmp_path / "straight", *steps)).state.step

    def signalled_at_the_last(*args: object) -> object:
        learner, batches, tokens, stop, late, seconds, *_ = args
        return real_step(learner, batches, tokens, stop or next(calls) == last, late, seconds)

    monkeypatch.setattr(train_module, "train_step", signalled_at_the_last)
    assert train(tiny(run, *steps)).state.validated is False  # a resume point at its end
    monkeypatch.undo()

    def stopped(signum: int, frame: object) -> None:  # what `mt` does on SIGTERM outside training
        raise SystemExit(128 + signum)

    real_save = ckpt._save_flat

    def signalled_while_saving(*args: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        real_save(*args)

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        monkeypatch.setattr(ckpt, "_save_flat", signalled_while_saving)
        result = train(tiny(run, *steps))  # the rerun validates and saves that end
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.state.validated and result.state.step == last
    assert [c.step for c in ckpt.list_checkpoints(run)] == [last]  # whole


def micro_batches() -> list:
    """Two micro-batches of an update with different target tokens (3 and 14, EOS included)."""
    short = collate([([5, 6, 7], [8, 9])], np.array([0]))
    long = collate([([5], [10, 11, 12, 13, 14, 15])] * 2, np.array([1, 2]))
    assert (short.tgt_tokens, long.tgt_tokens) == (3, 14)
    return [short, long]


def tiny_learner(*overrides: str) -> train_module.Learner:
    config = load_config(TINY, list(overrides))  # dropout 0: every pass the same function
    return train_module.build_learner(config, (30, 30), World(), torch.device("cpu"), "fp32")


def test_an_update_is_the_gradient_of_its_micro_batches_summed_loss_per_token() -> None:
    learner, batches = tiny_learner(), micro_batches()
    train_module.train_step(learner, batches, 17, stop=False, out_of_time=False)
    got = [p.grad.clone() for p in learner.params]
    learner.optimizer.zero_grad(set_to_none=True)
    # Per token of the whole update, not per micro-batch: (L_a + L_b) / (3 + 14).
    total = sum(
        label_smoothed_nll(learner.model(b.src, b.tgt_in), b.tgt_out, 0.1)[0] for b in batches
    )
    (total / 17).backward()
    for grad, param in zip(got, learner.params, strict=True):
        torch.testing.assert_close(grad, param.grad)


def test_gradients_are_clipped_once_the_loss_scale_is_taken_off() -> None:
    learner, batches = tiny_learner(), micro_batches()
    plain = train_module.train_step(learner, batches, 17, stop=False, out_of_time=False)
    unclipped = [p.grad.clone() for p in learner.params]
    learner.optimizer.zero_grad(set_to_none=True)
    # fp16's loss scaling (a CPU scaler: the order is what is tested) and a clip at half the norm.
    learner.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    learner.clip_norm = plain.norm / 2
    scaled = train_module.train_step(learner, batches, 17, stop=False, out_of_time=False)
    assert scaled.norm == pytest.approx(plain.norm, rel=1e-4)  # the norm logged is unscaled
    for grad, param in zip(unclipped, learner.params, strict=True):
        torch.testing.assert_close(param.grad, grad / 2, rtol=1e-4, atol=1e-7)


def test_no_two_micro_batches_of_a_run_share_a_dropout_seed() -> None:
    seeds = {train_module.step_seed(1, batch, step) for batch in range(4) for step in range(9_000)}
    assert len(seeds) == 4 * 9_000  # a sum repeated: batch 1 at step 100 was batch 0 at 8,019
    assert train_module.step_seed(1, 1, 100) != train_module.step_seed(1, 0, 8_019)
    assert all(0 <= s < 2**63 for s in seeds)  # what torch.manual_seed takes
